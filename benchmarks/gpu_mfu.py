"""bf16 model FLOPs utilisation of our train step on an accelerator, for a ~1B-parameter X-LLaVA.

The model: CLIP-B/16 at 224 px (frozen) + mlp2x_gelu projector + a LLaMA decoder (d 2048, 16 layers,
16 heads, MLP 5632, vocab 39,479): about 1.07B parameters. Projector and LLM train with AdamW;
float32 master weights, bfloat16 compute. MFU = model FLOPs per second (xllava_jax.train.flops) /
the bf16 matmul throughput XLA reaches on the same device in the same run (8192^3 products).

Example (on a GPU machine):
  python3 benchmarks/gpu_mfu.py
  python3 benchmarks/gpu_mfu.py --batch 4 --remat dots
  python3 benchmarks/gpu_mfu.py --tiny        # a seconds-long check of the script on a CPU
The last line printed is one JSON object (mfu, tokens_per_s, step_s, peak_tflops, params, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from xllava_jax.config import ModelConfig, TextConfig, VisionConfig  # noqa: E402
from xllava_jax.constants import IGNORE_INDEX  # noqa: E402
from xllava_jax.models.xllava import XLlava, count_params  # noqa: E402
from xllava_jax.train.flops import model_flops_per_step  # noqa: E402
from xllava_jax.train.optim import trainable_filter  # noqa: E402
from xllava_jax.train.step import make_train_step  # noqa: E402


def config(args) -> ModelConfig:
    if args.tiny:
        return ModelConfig.tiny(dtype=args.dtype, remat=args.remat)
    vision = VisionConfig(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072, num_layers=12,
                          num_heads=12)
    text = TextConfig(vocab_size=39479, hidden_size=args.hidden, intermediate_size=args.mlp, num_layers=args.layers,
                      num_heads=args.heads, num_kv_heads=args.heads, max_position_embeddings=4096)
    return ModelConfig(text=text, vision=vision, image_token_id=39478, dtype=args.dtype, remat=args.remat)


def make_batch(cfg: ModelConfig, batch: int, seq: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    n = cfg.num_image_tokens
    ids = rng.integers(3, cfg.image_token_id, size=(batch, seq)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, 1: 1 + n] = cfg.image_token_id
    labels = ids.copy()
    labels[:, : 1 + n] = IGNORE_INDEX
    size = cfg.vision.image_size
    pixels = rng.standard_normal((batch, 1, size, size, 3)).astype(np.float32)
    return {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels), "pixel_values": jnp.asarray(pixels),
            "attention_mask": jnp.ones((batch, seq), jnp.int32)}


def peak_matmul_tflops(dtype, n: int, repeats: int = 10) -> float:
    """Best bf16 (or f32) matmul TFLOP/s of n^3 products, timed on device."""
    a = jax.random.normal(jax.random.key(1), (n, n), dtype)
    b = jax.random.normal(jax.random.key(2), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--mlp", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--loss-chunk", type=int, default=64,
                   help="train.loss_chunk: lm_head + loss fused over supervised positions, this many per row at a "
                        "time; 0 = full logits (default 64, the trainer's default)")
    p.add_argument("--tiny", action="store_true", help="the tiny test model (checks the script on a CPU)")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.seq, args.steps = 2, 64, 2
    cfg = config(args)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
    model = XLlava(cfg, rngs=nnx.Rngs(0))
    params_total = count_params(model)
    graphdef, params, frozen, other = nnx.split(model, trainable_filter(("projector", "llm")), nnx.Param, ...)
    params, frozen, other = (nnx.to_pure_dict(s) for s in (params, frozen, other))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5))
    state = {"params": params, "opt": tx.init(params), "other": other, "step": jnp.zeros((), jnp.int32)}
    step = jax.jit(make_train_step(graphdef, tx, loss_chunk=args.loss_chunk), donate_argnums=(0,))
    batch = make_batch(cfg, args.batch, args.seq)
    t0 = time.perf_counter()
    state, m = step(state, frozen, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    state, m = step(state, frozen, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = step(state, frozen, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    flops = model_flops_per_step(cfg, batch, trainable_llm=True)
    peak = peak_matmul_tflops(jnp.dtype(args.dtype), 512 if args.tiny else 8192)
    achieved = flops / step_s / 1e12
    tokens = args.batch * args.seq / step_s
    print(f"params {params_total / 1e9:.3f}B  batch {args.batch}x{args.seq}  {args.dtype}  remat {args.remat}  "
          f"loss_chunk {args.loss_chunk}")
    loss = float(m["loss"])
    print(f"step {step_s * 1e3:.1f} ms (compile {compile_s:.1f} s), {tokens:,.0f} tokens/s, loss {loss:.3f}")
    print(f"model {achieved:.1f} TFLOP/s vs matmul peak {peak:.1f} TFLOP/s: MFU {achieved / peak:.1%}")
    print(json.dumps({"mfu": round(achieved / peak, 4), "model_tflops": round(achieved, 2),
                      "peak_tflops": round(peak, 1),
                      "tokens_per_s": round(tokens, 1), "step_s": round(step_s, 4), "params": params_total,
                      "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "remat": args.remat,
                      "loss_chunk": args.loss_chunk,
                      "device": jax.devices()[0].device_kind}))


if __name__ == "__main__":
    main()
