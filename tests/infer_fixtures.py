"""A tiny random X-LLaVA checkpoint (with its tokenizer) and small drawn images, for inference tests."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from data_fixtures import train_tokenizer
from PIL import Image, ImageDraw

from xllava_jax import checkpoint
from xllava_jax.config import ModelConfig, TextConfig
from xllava_jax.models.xllava import build_model
from xllava_jax.tokenizer.runtime import Tokenizer


def tiny_config(vocab_size: int) -> ModelConfig:
    """ModelConfig.tiny with room for `vocab_size` pieces plus the image placeholder (the last id),
    and 1024 positions so the llava_llama_2 system prompt (mostly single characters with a 500-piece
    tokenizer) plus an image and some new tokens fit."""
    text = TextConfig(**{**ModelConfig.tiny().text.to_dict(), "vocab_size": vocab_size + 1,
                         "max_position_embeddings": 1024})
    return ModelConfig.tiny(text=text, image_token_id=vocab_size)


def make_checkpoint(directory: Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint carrying `tokenizer.model` into `directory` (created); returns it."""
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = train_tokenizer(Path(tmp), seed=seed)
        cfg = tiny_config(Tokenizer(tok_path).vocab_size)
        checkpoint.save_checkpoint(directory, build_model(cfg, seed=seed), tokenizer_dir=tmp)
    return directory


def make_image(path: Path, seed: int = 0, size: tuple[int, int] | None = None) -> Path:
    """Draw a small PNG (random background, a coloured ellipse and rectangle) at `path`; returns it."""
    rng = random.Random(seed)
    width, height = size or (rng.randint(24, 64), rng.randint(24, 64))
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    draw.ellipse((2, 2, width // 2, height // 2), fill=tuple(rng.randrange(256) for _ in range(3)))
    draw.rectangle((width // 2, height // 2, width - 2, height - 2), fill=tuple(rng.randrange(256) for _ in range(3)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return Path(path)
