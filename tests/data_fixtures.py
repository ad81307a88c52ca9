"""Small tokenizers and VIF corpora made in the tests (no downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import sentencepiece as spm
from PIL import Image, ImageDraw

WORDS_EN = "the a red blue green circle square triangle what colour is shape how many are there left right top".split()
WORDS_KO = "빨간색 파란색 초록색 원 사각형 삼각형 무슨 색 모양 몇 개 있나요 왼쪽 오른쪽 위 아래 입니다".split()


def train_tokenizer(directory: Path, vocab_size: int = 500, seed: int = 0) -> Path:
    """A LLaMA-style BPE SentencePiece model (<unk>=0, <s>=1, </s>=2, byte fallback)."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS_EN + WORDS_KO) for _ in range(12)) for _ in range(2000)]
    (directory / "tok_corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(directory / "tok_corpus.txt"), model_prefix=str(directory / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, minloglevel=2)
    return directory / "tokenizer.model"


def make_vif_corpus(directory: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """n records with small drawn images (every third one text-only); returns (corpus.jsonl, image root)."""
    rng = random.Random(seed)
    root = directory / "images"
    root.mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        record = {"id": f"r{i}", "lang": "en" if i % 2 else "ko"}
        q = rng.choice(["What colour is the shape?", "무슨 색인가요?"])
        a = rng.choice(["Red.", "파란색입니다.", "A blue circle on the left."])
        if i % 3:
            w, h = rng.randint(20, 60), rng.randint(20, 60)
            img = Image.new("RGB", (w, h), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
            ImageDraw.Draw(img).ellipse((2, 2, w // 2, h // 2), fill="red")
            img.save(root / f"{i}.png")
            record["image"] = f"{i}.png"
            q = "<image>\n" + q
        record["conversations"] = [{"from": "human", "value": q}, {"from": "gpt", "value": a},
                                   {"from": "human", "value": "And?"}, {"from": "gpt", "value": "That is all."}]
        lines.append(json.dumps(record, ensure_ascii=False))
    path = directory / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, root


def assert_restores_exactly(ds, skip: int, take: int) -> None:
    """Iterating `ds` past `skip` batches, saving the iterator state (through JSON, as a checkpoint
    stores it) and restoring it into a fresh iterator gives the same next `take` batches."""
    import numpy as np

    it = iter(ds)
    for _ in range(skip):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(take)]
    again = iter(ds)
    again.set_state(json.loads(json.dumps(state)))
    for w in want:
        got = next(again)
        for key in w:
            np.testing.assert_array_equal(got[key], w[key])
    for i in (it, again):
        if hasattr(i, "close"):
            i.close()
