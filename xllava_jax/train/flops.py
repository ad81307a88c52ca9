"""Model FLOPs of a train step, for throughput and MFU figures (no heavy imports: benchmarks use it)."""

from __future__ import annotations

from xllava_jax.config import ModelConfig


def model_flops_per_step(model_cfg: ModelConfig, batch: dict, trainable_llm: bool) -> float:
    """Matmul FLOPs of one train step on a batch (input_ids int[B, S], optional pixel_values).

    LLM: 6 x matmul params per token (forward 2, backward 4; 4 when only activations need gradients,
    i.e. when just the projector trains) plus causal attention (forward 2 x S^2 x D per layer and
    sample, times 3 with the backward). The frozen vision tower: forward only, 2 x params per patch.
    """
    t, v = model_cfg.text, model_cfg.vision
    b, s = batch["input_ids"].shape
    d, f = t.hidden_size, t.intermediate_size
    q, kv = t.num_heads * t.dim_per_head, t.num_kv_heads * t.dim_per_head
    per_layer = d * (2 * q + 2 * kv) + 3 * d * f
    llm = t.num_layers * per_layer + d * t.vocab_size
    factor = 6 if trainable_llm else 4
    flops = factor * llm * b * s + factor * t.num_layers * s * s * q * b
    if v is not None and "pixel_values" in batch:
        vit = v.num_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
        flops += 2 * vit * (v.num_patches + 1) * batch["pixel_values"].shape[0] * batch["pixel_values"].shape[1]
    return float(flops)


def matmul_peak_flops(dtype: str = "float32", repeats: int = 5) -> float:
    """FLOP/s that XLA reaches on one square matmul on the first device (1024^3 on CPUs, 8192^3
    elsewhere), best of `repeats`: the yardstick for MFU."""
    import time

    import jax
    import jax.numpy as jnp

    n = 1024 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
