"""Tokenizers: the runtime SentencePiece `Tokenizer` and `TokenizerError` (runtime.py), and the vocabulary
tools (expand.py, stats.py, cli.py, hf_files.py): expand a SentencePiece model with new pieces, measure
tokenizer compression. Importing the package loads only runtime.py; the tools load on first use.
"""

import importlib

from xllava_jax.tokenizer.runtime import Tokenizer, TokenizerError

_TOOLS = {"expand_tokenizer": "expand", "read_expansion": "expand", "compute_stats": "stats"}

__all__ = ["Tokenizer", "TokenizerError", "compute_stats", "expand_tokenizer", "read_expansion"]


def __getattr__(name: str):
    if name in _TOOLS:
        return getattr(importlib.import_module(f"xllava_jax.tokenizer.{_TOOLS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
