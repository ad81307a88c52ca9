"""The real trainer's step against an HF transformers + torch AdamW step, side by side, on bench_small.

Ours: `xllava_jax.train.setup.prepare` (the step `xllava train` runs: micro-batched gradients over
the projector + LLM, clipping, per-group AdamW, the non-finite guard, explicit shardings, donated state)
with the `vif` stage config. Anchor: `LlavaForConditionalGeneration` with the same config, vision tower
frozen, torch AdamW, gradient clipping at 1.0. Batch 4 x 512 tokens (1 bos + 196 image + 315 text),
float32, the same thread count. Also prints MFU against the float32 matmul throughput XLA reaches on
this machine in the same run, and this process's peak memory after our side ran (before the anchor
is built).

Example:
  .venv/bin/python benchmarks/train_bench.py            # about two minutes on 2 cores
  .venv/bin/python benchmarks/train_bench.py --iters 3
The last line printed is one JSON object with the keys `speedup`, `mfu` and `peak_rss_gb`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import model_bench as mb  # noqa: E402  (the HF anchor, batch maker and machine yardsticks)

from xllava_jax.train.config import apply_overrides, load_config  # noqa: E402
from xllava_jax.train.flops import model_flops_per_step  # noqa: E402
from xllava_jax.train.setup import make_mesh, prepare  # noqa: E402
from xllava_jax.train.stage_config import StageConfig  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=6, help="timed steps per side (default 6)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    args = p.parse_args(argv)
    load = mb.OtherLoad()

    config = StageConfig.from_config_dict(apply_overrides(load_config(str(ROOT / "configs/vif.py:demo")), [
        "model.preset=bench_small", f"train.batch_size={mb.BATCH}", f"train.lr={mb.LR}",
        f"train.weight_decay={mb.WEIGHT_DECAY}", "train.clip_norm=1.0", "train.warmup_ratio=0.0",
        "train.schedule=constant"]))
    mesh = make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        run = prepare(config, mesh)
        cfg = run.model_cfg
        ids, labels, pixels = mb.make_batch(cfg, mb.BATCH, mb.SEQ)
        batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels),
                 "pixel_values": jnp.asarray(pixels)[:, None], "attention_mask": jnp.ones_like(jnp.asarray(ids))}
        state = {"value": run.state}

        def step():
            state["value"], metrics = run.step_fn(state["value"], run.frozen, batch)
            jax.block_until_ready(metrics)

        def ours():
            with jax.set_mesh(mesh):
                step()

        for _ in range(2):
            ours()
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    matmul, _ = mb.matmul_flops_per_s(5)

    hf = mb.HF(cfg, args.threads)
    trainable = [q for q in hf.model.parameters() if q.requires_grad]
    ids_t, labels_t, pixels_t = hf._tensors((ids, labels, pixels))

    def anchor():
        hf.model.train()
        loss = hf.model(input_ids=ids_t, pixel_values=pixels_t, labels=labels_t).loss
        loss.backward()
        hf.torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        hf.opt.step()
        hf.opt.zero_grad(set_to_none=True)

    # Both sides timed in alternation (a change in the machine's load hits both alike).
    sec = mb.paired({"ours": ours, "hf": anchor}, args.iters, warmup=1)
    ours_s, hf_s = sec["ours"], sec["hf"]
    tokens = mb.BATCH * mb.SEQ
    flops = model_flops_per_step(cfg, batch, trainable_llm=True)
    mfu = flops / ours_s / matmul
    print(f"ours (xllava train step) {tokens / ours_s:8.1f} tokens/s  {ours_s * 1e3:7.1f} ms/step")
    print(f"HF + torch AdamW         {tokens / hf_s:8.1f} tokens/s  {hf_s * 1e3:7.1f} ms/step")
    print(f"speedup {hf_s / ours_s:.2f}x, MFU {mfu:.1%} of {matmul / 1e9:.1f} GFLOP/s (XLA f32 matmul here), "
          f"peak RSS after our side {peak_rss_gb:.2f} GB")
    result = {"speedup": round(hf_s / ours_s, 3), "mfu": round(mfu, 4), "peak_rss_gb": round(peak_rss_gb, 3),
              "ours_tokens_per_s": round(tokens / ours_s, 1), "hf_tokens_per_s": round(tokens / hf_s, 1),
              "matmul_gflops": round(matmul / 1e9, 1)}
    load.record(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
