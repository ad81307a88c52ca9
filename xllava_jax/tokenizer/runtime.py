"""SentencePiece tokenizer with the encodings the conversation templates need.

`encode(text)` tokenises a string that starts a sequence (SentencePiece's dummy-prefix piece `▁` is
added, as for any fresh string); `encode(text, start=False)` tokenises a continuation, so that
concatenated segments give the ids the whole string would. `encode_llama_slow(text)` follows LLaMA's
slow (legacy) HF tokenizer: literal `<s>`, `</s>` and `<unk>` become their ids and every text piece
between them is tokenised as a fresh string. `TokenizerError` is the error of this module and of the
vocabulary tools (expand, stats, resize). This module imports no vocabulary tool.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from xllava_jax.errors import UserError


class TokenizerError(UserError):
    """Bad tokenizer input (a missing or unreadable model, a bad flag of the vocabulary tools); the
    message is one line that says what and where."""


def tokenizer_file(path: str | Path) -> Path:
    """`path` itself, or the `tokenizer.model` inside a directory."""
    path = Path(path)
    file = path / "tokenizer.model" if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"{file}: no SentencePiece model found")
    return file


class Tokenizer:
    """A SentencePiece model (LLaMA style: `<unk>`, `<s>`, `</s>`, byte fallback)."""

    def __init__(self, path: str | Path):
        self.path = tokenizer_file(path)
        proto = sp_pb2.ModelProto()
        try:
            proto.ParseFromString(self.path.read_bytes())
            self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except Exception as e:  # noqa: BLE001 - protobuf and sentencepiece raise several kinds
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({e})") from None
        proto.normalizer_spec.add_dummy_prefix = False
        self._continuation = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        # LLaMA has no pad piece; LLaVA pads with <unk>.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.unk_id
        specials = {self.sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.unk_id) if i >= 0}
        self._specials = specials
        alternatives = "|".join(re.escape(p) for p in sorted(specials, key=len, reverse=True))
        self._special_re = re.compile(f"({alternatives})")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, start: bool = True) -> list[int]:
        """Ids of `text`, no bos/eos. start=False: a continuation (no dummy-prefix piece)."""
        return (self.sp if start else self._continuation).encode(text) if text else []

    def encode_llama_slow(self, text: str) -> list[int]:
        """LLaMA's legacy slow HF tokenizer, without the bos it prepends: special-token literals
        become ids (no stripping around them) and each text piece is encoded as a fresh string."""
        return [token for token, _, _ in self.llama_slow_tokens(text)]

    def llama_slow_tokens(self, text: str) -> list[tuple[int, int, int]]:
        """`encode_llama_slow` with each token's character span (begin, end) in `text`; the
        dummy-prefix piece has an empty span."""
        out = []
        pos = 0
        for part in self._special_re.split(text):
            if part in self._specials:
                out.append((self._specials[part], pos, pos + len(part)))
            elif part:
                raw = part.encode("utf-8")
                for piece in self.sp.encode(part, out_type="proto").pieces:
                    begin = len(raw[: piece.begin].decode("utf-8", errors="ignore"))
                    end = len(raw[: piece.end].decode("utf-8", errors="ignore"))
                    out.append((piece.id, pos + begin, pos + end))
            pos += len(part)
        return out

    def decode(self, ids) -> str:
        """Text of `ids`; ids the SentencePiece model lacks (the image placeholder a sampler may draw, vocabulary
        padding) decode to nothing, as HF's `decode(..., skip_special_tokens=True)` drops them."""
        size = self.vocab_size
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < size])

    def piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))


@functools.cache
def tokenizer_for(path: str) -> Tokenizer:
    """One Tokenizer per process and path (grain workers build their own on first use)."""
    return Tokenizer(path)
