"""Pretraining corpora: sources, packing with segment ids, mixing, per-process shards, resume."""

import json

import numpy as np
import pytest
import sentencepiece as spm

from xllava_jax.constants import IGNORE_INDEX
from xllava_jax.data.text import CorpusError, open_source, text_dataset
from xllava_jax.tokenizer.runtime import Tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    en = [f"english document {i} " + "the cat sat on the mat " * (1 + i % 7) for i in range(300)]
    ko = [f"한국어 문서 {i} " + "고양이가 매트 위에 앉았습니다 " * (1 + i % 5) for i in range(200)]
    (d / "en.txt").write_text("\n".join(en) + "\n\n")
    (d / "ko.jsonl").write_text("\n".join(json.dumps({"body": t}, ensure_ascii=False) for t in ko))
    spm.SentencePieceTrainer.train(input=str(d / "en.txt"), model_prefix=str(d / "tok"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2)
    return d


def test_sources(corpus):
    assert len(open_source(str(corpus / "en.txt"))) == 300
    ko = open_source(str(corpus / "ko.jsonl") + ":body")
    assert len(ko) == 200 and ko[3].startswith("한국어 문서 3")
    with pytest.raises(CorpusError, match="'text' field"):
        open_source(str(corpus / "ko.jsonl"))[0]
    with pytest.raises(CorpusError, match="cannot read"):
        open_source(str(corpus / "missing.txt"))


def test_packing_keeps_documents_apart(corpus):
    ds = text_dataset([str(corpus / "en.txt")], str(corpus / "tok.model"), seq_len=96)
    ex = next(iter(ds))
    seg, pos, labels, ids = ex["segment_ids"], ex["positions"], ex["labels"], ex["input_ids"]
    assert ids.shape == (96,) and ids.dtype == np.int32
    starts = np.flatnonzero(np.diff(seg)) + 1
    assert len(starts) >= 1
    for s in starts:
        assert pos[s] == 0 and labels[s] == IGNORE_INDEX  # no loss across a document boundary
    inside = (seg > 0) & (np.concatenate([[False], seg[1:] == seg[:-1]]))
    np.testing.assert_array_equal(labels[inside], ids[inside])


def test_mixing_weights_and_process_shards(corpus):
    specs = [str(corpus / "en.txt"), str(corpus / "ko.jsonl") + ":body"]
    tok = str(corpus / "tok.model")
    ds = text_dataset(specs, tok, seq_len=64, weights=[0.8, 0.2])
    decode = Tokenizer(tok).decode
    it, korean, total = iter(ds), 0, 0
    for _ in range(60):
        ex = next(it)
        for s in np.unique(ex["segment_ids"][ex["segment_ids"] > 0]):
            text = decode(ex["input_ids"][ex["segment_ids"] == s])
            korean += any("\uac00" <= ch <= "\ud7a3" for ch in text)
            total += 1
    assert 0.1 < korean / total < 0.35, (korean, total)
    shards = [text_dataset(specs, tok, seq_len=64, process_index=i, process_count=2) for i in range(2)]
    a, b = (next(iter(s))["input_ids"] for s in shards)
    assert not np.array_equal(a, b)


def test_iterator_state_round_trip(corpus):
    ds = text_dataset([str(corpus / "en.txt")], str(corpus / "tok.model"), seq_len=64)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    want = [next(it)["input_ids"] for _ in range(5)]
    again = iter(ds)
    again.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(again)["input_ids"], w)


def test_array_record_and_tfds_text_sources(corpus, tmp_path):
    import tensorflow_datasets as tfds
    from array_record.python.array_record_module import ArrayRecordWriter

    docs = ["첫 번째 문서입니다.", "the second document", "세 번째"]
    writer = ArrayRecordWriter(str(tmp_path / "docs.array_record"), "group_size:1")
    for i, d in enumerate(docs):
        writer.write(d.encode() if i % 2 else json.dumps({"text": d}).encode())
    writer.close()
    source = open_source(f"array_record:{tmp_path}/*.array_record")
    assert [source[i] for i in range(3)] == docs

    class TextDocs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, d in enumerate(docs):
                yield str(i), {"text": d}

    TextDocs(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    source = open_source(f"tfds:text_docs/train@{tmp_path / 'tfds'}")
    assert sorted(source[i] for i in range(len(source))) == sorted(docs)
    ds = text_dataset([f"tfds:text_docs/train@{tmp_path / 'tfds'}"], str(corpus / "tok.model"), seq_len=32)
    assert next(iter(ds))["input_ids"].shape == (32,)
