"""Vocabulary tools: expand a SentencePiece model with new pieces, measure tokenizer compression."""

from xllava_jax.tokenizer.expand import TokenizerError, expand_tokenizer, read_expansion
from xllava_jax.tokenizer.stats import compute_stats

__all__ = ["TokenizerError", "compute_stats", "expand_tokenizer", "read_expansion"]
