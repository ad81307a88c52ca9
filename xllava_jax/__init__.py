"""xllava_jax: a JAX-native X-LLaVA (bilingual Korean + English LLaVA-1.5 recipe)."""

from xllava_jax.config import ModelConfig, TextConfig, VisionConfig

__all__ = ["ModelConfig", "TextConfig", "VisionConfig", "load_pretrained"]


def load_pretrained(path, **kwargs):
    """Load a Hugging Face directory (any supported layout) or one of our checkpoints; returns the model."""
    from xllava_jax.convert.load import load_pretrained as _load

    return _load(path, **kwargs)
