"""Train the BPE model whose pieces the train-corpus route appends (the Chinese-LLaMA recipe).

The model is trained as BPE with the base's splitting and normalisation settings, so its pieces are
built the way the base builds its own; pieces of a unigram model would lack BPE's intermediate pieces
and fall apart into single syllables once merged into a BPE base.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import TypeVar

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb
from tqdm import tqdm

BUILTIN_NORMALIZERS = ("identity", "nfkc", "nmt_nfkc", "nfkc_cf", "nmt_nfkc_cf")
MAX_SENTENCES = 2_000_000  # sentences sampled from the corpus for training
MAX_SENTENCE_BYTES = 1 << 16
T = TypeVar("T")


def bpe_options(base: pb.ModelProto, vocab_size: int) -> dict:
    """sentencepiece trainer options: BPE, no byte pieces, full character coverage, and the base's
    normaliser, whitespace and digit handling."""
    spec, norm = base.trainer_spec, base.normalizer_spec
    return {
        "model_type": "bpe", "vocab_size": vocab_size, "hard_vocab_limit": False, "byte_fallback": False,
        "character_coverage": 1.0, "split_digits": spec.split_digits, "split_by_whitespace": spec.split_by_whitespace,
        "split_by_unicode_script": spec.split_by_unicode_script, "split_by_number": spec.split_by_number,
        "treat_whitespace_as_suffix": spec.treat_whitespace_as_suffix,
        "allow_whitespace_only_pieces": spec.allow_whitespace_only_pieces,
        "max_sentencepiece_length": spec.max_sentencepiece_length or 16,
        "normalization_rule_name": norm.name if norm.name in BUILTIN_NORMALIZERS else "identity",
        "add_dummy_prefix": norm.add_dummy_prefix, "remove_extra_whitespaces": norm.remove_extra_whitespaces,
        "input_sentence_size": MAX_SENTENCES, "shuffle_input_sentence": True,
        "max_sentence_length": MAX_SENTENCE_BYTES, "num_threads": min(16, os.cpu_count() or 1), "minloglevel": 2,
    }


def with_ticker(work: Callable[[], T], desc: str, progress: bool) -> T:
    """Run `work()` while a tqdm line shows the elapsed time (sentencepiece reports no progress)."""
    if not progress:
        return work()
    with ThreadPoolExecutor(max_workers=1) as pool, tqdm(desc=desc, bar_format="{desc}: {elapsed}") as bar:
        future = pool.submit(work)
        while not wait([future], timeout=0.5).done:
            bar.refresh()
        return future.result()


def train_bpe(files: Sequence[Path], base: pb.ModelProto, vocab_size: int, progress: bool = False) -> pb.ModelProto:
    """A BPE model of at most `vocab_size` pieces trained on `files` (fewer where the text runs out of
    merges). Raises RuntimeError when sentencepiece refuses the input."""
    buffer = io.BytesIO()

    def work() -> None:
        spm.SentencePieceTrainer.train(input=[str(f) for f in files], model_writer=buffer,
                                       **bpe_options(base, vocab_size))

    with_ticker(work, f"training a BPE model of up to {vocab_size} pieces", progress)
    proto = pb.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    return proto
