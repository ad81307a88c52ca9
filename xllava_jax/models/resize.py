"""`xllava vocab resize`: a checkpoint + an expanded tokenizer -> the expanded checkpoint (the embedding
resize itself is `models.vocab.resize_vocab`).

Input embeddings and lm_head grow to the expanded vocabulary (old rows bit for bit; new rows by default
the mean of the rows of the base-tokenizer pieces each new token splits into, from expansion.json), and
the new checkpoint carries the expanded tokenizer files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tqdm import tqdm

from xllava_jax import checkpoint as ckpt
from xllava_jax.models.vocab import INIT_METHODS, resize_vocab
from xllava_jax.tokenizer.expand import MODEL_FILE, check_out_dir, load_proto, read_expansion
from xllava_jax.tokenizer.runtime import TokenizerError

# Files that describe the vocabulary: taken from the expanded tokenizer, never from the old checkpoint.
VOCAB_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "expansion.json")


def copy_expanded_tokenizer(old_checkpoint: Path, tokenizer_dir: Path, out: Path) -> None:
    """The old checkpoint's other tokenizer/processor files (chat template, generation and processor
    configs) and the expanded tokenizer's vocabulary files into `out`."""
    for name in ckpt.TOKENIZER_FILES:
        source = tokenizer_dir / name if name in VOCAB_FILES else old_checkpoint / name
        if source.is_file():
            shutil.copy2(source, out / name)


def check_checkpoint(checkpoint: str | Path, base_size: int) -> None:
    """Check, from its metadata alone, that `checkpoint` is an xllava checkpoint with a vocabulary of
    exactly `base_size` rows (rows past the SentencePiece vocabulary, such as an added `<image>` token or
    padding, would take the ids of new pieces)."""
    if not ckpt.is_checkpoint(checkpoint):
        raise TokenizerError(f"`checkpoint` {checkpoint}: not an xllava checkpoint (no {ckpt.META_FILE}); "
                             "convert a HF model first with `xllava convert hf2jax`")
    meta = ckpt.read_meta(checkpoint)
    if meta["kind"] != "xllava":
        raise TokenizerError(f"`checkpoint` {checkpoint}: a {meta['kind']} checkpoint has no vocabulary")
    vocab = ckpt.config_from_meta(meta).text.vocab_size
    if vocab != base_size:
        raise TokenizerError(
            f"`checkpoint` {checkpoint}: vocabulary of {vocab} rows, but the tokenizer was expanded from "
            f"{base_size} pieces; rows past the SentencePiece vocabulary (added tokens, padding) would take new "
            "pieces' ids: expand the checkpoint the tokenizer came from")


def expand_checkpoint(checkpoint: str | Path, tokenizer_dir: str | Path, out: str | Path, *,
                      method: str = "subword_mean", pad_to_multiple_of: int | None = None, seed: int = 0,
                      out_setting: str = "out", progress: bool = False) -> Path:
    """Write to `out` the checkpoint `checkpoint` with its vocabulary grown to `tokenizer_dir`'s expansion
    (see `check_checkpoint` for what fits). `method`: subword_mean, mean or normal (see `resize_vocab`).
    Errors name `out` as `out_setting`."""
    checkpoint, tokenizer_dir = Path(checkpoint), Path(tokenizer_dir)
    if method not in INIT_METHODS:
        raise TokenizerError(f"`method` {method}: choose one of {', '.join(INIT_METHODS)}")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise TokenizerError(f"`pad_to_multiple_of` {pad_to_multiple_of}: must be at least 1")
    record = read_expansion(tokenizer_dir)
    size = len(load_proto(tokenizer_dir, "tokenizer").pieces)
    if size != record["new_size"]:
        raise TokenizerError(f"{tokenizer_dir / MODEL_FILE}: {size} pieces, but expansion.json says "
                             f"{record['new_size']}; the two files do not belong together")
    check_checkpoint(checkpoint, record["base_size"])
    out = check_out_dir(out, out_setting)
    with tqdm(total=3, desc="loading checkpoint", disable=not progress) as bar:
        model, meta = ckpt.load_checkpoint(checkpoint)
        bar.update()
        bar.set_description(f"resizing {record['base_size']} -> {record['new_size']} ({method})")
        subwords = [t["subword_ids"] for t in record["new_tokens"]] if method == "subword_mean" else ()
        grown = resize_vocab(model, record["new_size"], method, subword_ids=subwords,
                             pad_to_multiple_of=pad_to_multiple_of, seed=seed)
        bar.update()
        bar.set_description("saving checkpoint")
        ckpt.save_checkpoint(out, grown, source=meta.get("source"), source_format=meta.get("source_format"))
        copy_expanded_tokenizer(checkpoint, tokenizer_dir, out)
        bar.update()
    return out
