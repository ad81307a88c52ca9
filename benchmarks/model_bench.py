"""Side-by-side speed of our model and HF transformers on the `bench_small` config (DESIGN.md).

Measures, in one process, float32 on the CPU (or whatever JAX backend is present for our side):
  train    forward + backward + AdamW, batch 4 x 512 tokens (1 bos + 196 image + 315 text), with images;
           projector + LLM trained, vision tower frozen (stage-2 recipe), same on both sides.
  prefill  forward (all logits) of the same batch, no gradients.
  decode   greedy generation at batch 1: 64 new tokens after a 300-token prompt (with its image).
It also measures the matmul throughput XLA reaches here (for MFU) and the memory bandwidth (for the
batch-1 decode bound: bandwidth / bytes of LLM weights read per token).

Example:
  .venv/bin/python benchmarks/model_bench.py            # full run (a few minutes)
  .venv/bin/python benchmarks/model_bench.py --quick    # fewer iterations
The last line printed is one JSON object (train_speedup, prefill_speedup, decode_speedup, mfu, ...).
"""

from __future__ import annotations

import argparse
import os
import sys

# XLA CPU settings used for our side; they must be in the environment before jax is imported.
XLA_CPU_FLAGS = ""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer timed iterations (about half the run time)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads; XLA uses all cores of the machine (default: %(default)s)")
    p.add_argument("--skip-hf", action="store_true", help="time our side only (ratios are then omitted)")
    p.add_argument("--only", choices=("train", "prefill", "decode"), action="append",
                   help="run only these measurements (repeatable; default: all)")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if XLA_CPU_FLAGS and XLA_CPU_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + XLA_CPU_FLAGS).strip()

import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from xllava_jax.config import ModelConfig  # noqa: E402
from xllava_jax.constants import IGNORE_INDEX  # noqa: E402
from xllava_jax.models.xllava import build_model  # noqa: E402
from xllava_jax.train.step import forward_loss_sum  # noqa: E402

try:
    from xllava_jax.infer.generate import GenerationConfig, Generator
except ImportError:  # the generation module is optional for this benchmark
    GenerationConfig = Generator = None

BATCH, SEQ = 4, 512
PROMPT, NEW_TOKENS = 300, 64
LR, WEIGHT_DECAY = 1e-4, 0.01


# ----------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn, iters: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `iters` calls after `warmup` calls (fn must block)."""
    return paired({"fn": fn}, iters, warmup)["fn"]


def paired(fns: dict, iters: int, warmup: int = 1, settle: int = 1) -> dict[str, float]:
    """Median seconds per blocking callable, timed in alternation (so that a change in the machine's
    load during the run hits every side alike) after `warmup` calls of each.

    Each turn starts with `settle` untimed calls: the first call after the other framework ran is
    slower (its freed memory and caches are laid out for the other side; measured on the train step:
    3.9 s alone, 4.0-5.7 s right after an HF step, on either side of the comparison)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            for _ in range(settle if len(fns) > 1 else 0):
                fn()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


class OtherLoad:
    """CPU time taken by everything but this process (other processes, the hypervisor's steal)
    while the benchmark runs, in cores; from /proc/stat, so Linux only (None elsewhere)."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        t = os.times()
        return time.perf_counter(), sum(fields) - fields[3] - fields[4], t.user + t.system

    def cores(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = (end[1] - self.start[1]) / tick
        return max(0.0, busy - (end[2] - self.start[2])) / (end[0] - self.start[0])

    def record(self, result: dict) -> None:
        """Put the load so far into `result` (as other_load_cores) and warn when it makes timings noisy."""
        other = self.cores()
        if other is None:
            return
        result["other_load_cores"] = round(other, 2)
        if other > 0.2:
            log(f"warning: other processes took {other:.2f} cores on average during this run; timings are "
                "noisy (torch suffers more than XLA from a busy machine), rerun on a quiet machine")


def make_batch(cfg: ModelConfig, batch: int, seq: int, seed: int = 0):
    """input_ids int[B, S] (bos, image placeholders, text), labels int[B, S], pixels float[B, H, W, 3]."""
    rng = np.random.default_rng(seed)
    n_img = cfg.num_image_tokens
    text = rng.integers(3, cfg.image_token_id, size=(batch, seq - 1 - n_img))
    ids = np.concatenate([np.full((batch, 1), cfg.text.bos_token_id), np.full((batch, n_img), cfg.image_token_id),
                          text], axis=1).astype(np.int32)
    labels = ids.copy()
    labels[:, : 1 + n_img] = IGNORE_INDEX
    size = cfg.vision.image_size
    pixels = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    return ids, labels, pixels


# ----------------------------------------------------------------------------- machine yardsticks
def matmul_flops_per_s(iters: int) -> tuple[float, dict[str, float]]:
    """Best float32 matmul FLOP/s XLA reaches here, over a square and the model's own shapes."""
    shapes = {"2048x2048x2048": (2048, 2048, 2048), "2048x512x1376": (2048, 512, 1376),
              "2048x1376x512": (2048, 1376, 512), "2048x512x512": (2048, 512, 512),
              "2048x512x39479": (2048, 512, 39479)}
    out = {}
    dot = jax.jit(jnp.dot)
    for name, (m, k, n) in shapes.items():
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
        sec = timed(lambda a=a, b=b: dot(a, b).block_until_ready(), iters, warmup=2)
        out[name] = 2 * m * k * n / sec
    return max(out.values()), out


def memory_bandwidth(iters: int) -> float:
    """Best bytes/s of streaming 256 MiB from memory, over a numpy copy (read + write), a jitted sum
    and jitted matrix-vector products in both orientations (v @ W, the decode step's, and W @ v, which
    reads rows; the latter streams 5-15% faster here), all far beyond the caches."""
    n = 64 * 1024 * 1024
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    rates = [2 * src.nbytes / timed(lambda: np.copyto(dst, src), iters)]
    x = jnp.ones(n, jnp.float32)
    total = jax.jit(jnp.sum)
    rates.append(x.nbytes / timed(lambda: total(x).block_until_ready(), iters))
    gemv = jax.jit(jnp.dot)
    for rows in (256, 1024):
        w = x.reshape(rows, -1)
        v, u = jnp.ones((1, rows), jnp.float32), jnp.ones((w.shape[1],), jnp.float32)
        rates.append(w.nbytes / timed(lambda v=v, w=w: gemv(v, w).block_until_ready(), iters))
        rates.append(w.nbytes / timed(lambda w=w, u=u: gemv(w, u).block_until_ready(), iters))
    return max(rates)


# ----------------------------------------------------------------------------- FLOP and byte counts
def llm_matmul_params(cfg: ModelConfig) -> int:
    t = cfg.text
    hd = t.dim_per_head
    attn = t.hidden_size * hd * (2 * t.num_heads + 2 * t.num_kv_heads)
    mlp = 3 * t.hidden_size * t.intermediate_size
    return t.num_layers * (attn + mlp) + t.hidden_size * t.vocab_size  # layers + lm_head


def decode_bytes_per_token(cfg: ModelConfig) -> int:
    """Bytes of LLM weights read per decoded token: all layers, final norm and lm_head (float32)."""
    t = cfg.text
    norms = (2 * t.num_layers + 1) * t.hidden_size
    return 4 * (llm_matmul_params(cfg) + norms)


def train_step_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Model FLOPs of one train step (matmuls + attention; the convention of PaLM's MFU).

    Trained parts (LLM incl. lm_head, projector): 6 * params * tokens. Frozen vision tower (forward
    only, up to the feature layer): 2 * params * tokens. Attention scores and values: 4 * S^2 * d per
    layer and sequence forward (full square, not halved for causality), x3 for the trained LLM.
    """
    v, t = cfg.vision, cfg.text
    layer = cfg.vision_feature_layer
    n_img_layers = v.num_layers + 1 + layer if layer < 0 else layer
    vis_tokens = v.num_patches + 1
    vis_layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    patch = v.patch_size**2 * v.num_channels * v.hidden_size
    vision = batch * (2 * (n_img_layers * vis_layer * vis_tokens + patch * v.num_patches)
                      + n_img_layers * 4 * vis_tokens**2 * v.hidden_size)
    proj_params = v.hidden_size * t.hidden_size + t.hidden_size**2
    projector = 6 * proj_params * batch * cfg.num_image_tokens
    llm = 6 * llm_matmul_params(cfg) * batch * seq
    attention = 3 * t.num_layers * batch * 4 * seq**2 * t.num_heads * t.dim_per_head
    return float(vision + projector + llm + attention)


# ----------------------------------------------------------------------------- our side
def trainable_filter():
    """Projector + LLM parameters (the vision tower stays frozen, as in stage 2)."""
    return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vision_tower")))


class Ours:
    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        model = build_model(cfg, seed=0)
        self.graphdef, self.trainable, self.rest = nnx.split(model, trainable_filter(), ...)
        self.tx = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WEIGHT_DECAY)
        self.opt_state = self.tx.init(self.trainable)
        graphdef, tx = self.graphdef, self.tx

        def train_step(trainable, opt_state, rest, ids, labels, pixels):
            def loss_fn(params):
                # The trainer's loss: lm_head + cross-entropy fused over the supervised positions.
                total, count = forward_loss_sum(nnx.merge(graphdef, params, rest),
                                                {"input_ids": ids, "labels": labels, "pixel_values": pixels})
                return total / count

            loss, grads = jax.value_and_grad(loss_fn)(trainable)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, loss

        def prefill(trainable, rest, ids, pixels):
            return nnx.merge(graphdef, trainable, rest)(ids, pixels)

        self.train_step = jax.jit(train_step, donate_argnums=(0, 1))
        self.prefill = jax.jit(prefill)
        self.generate = jax.jit(self._generate, static_argnames=("max_new",))

    def _generate(self, trainable, rest, ids, pixels, max_new: int):
        """Greedy decode with a KV cache (used when xllava_jax.infer.generate is missing):
        int[B, T] prompt -> int[B, max_new] new tokens."""
        model = nnx.merge(self.graphdef, trainable, rest)
        lm = model.language_model
        embeds = model.embed(ids, pixels)
        b, t, _ = embeds.shape
        cache = lm.init_cache(b, t + max_new)
        logits, cache = lm(inputs_embeds=embeds, cache=cache, cache_index=0)
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        out = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(token)

        def step(i, carry):
            token, cache, out = carry
            logits, cache = lm(token[:, None], cache=cache, cache_index=t + i - 1)
            token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
            return token, cache, out.at[:, i].set(token)

        return jax.lax.fori_loop(1, max_new, step, (token, cache, out))[2]

    def train_runner(self, batch):
        ids, labels, pixels = (jnp.asarray(x) for x in batch)

        def run():
            self.trainable, self.opt_state, loss = self.train_step(
                self.trainable, self.opt_state, self.rest, ids, labels, pixels)
            loss.block_until_ready()

        return run

    def prefill_runner(self, batch):
        ids, _, pixels = (jnp.asarray(x) for x in batch)
        return lambda: self.prefill(self.trainable, self.rest, ids, pixels).block_until_ready()

    def generate_runner(self, prompt, max_new: int):
        ids, _, pixels = prompt
        if Generator is None:
            ids, pixels = jnp.asarray(ids), jnp.asarray(pixels)
            return lambda: self.generate(self.trainable, self.rest, ids, pixels, max_new=max_new).block_until_ready()
        # Greedy, no eos, prompt bucket = prompt length (no padding): the same work as HF's generate.
        # Built here, from the current weights (the train step donates the earlier ones).
        generator = Generator(nnx.merge(self.graphdef, self.trainable, self.rest))
        config = GenerationConfig(max_new_tokens=max_new, bucket=ids.shape[1])

        def run():
            out = generator.generate(ids, pixels, config)
            assert len(out.tokens[0]) == max_new

        return run


# ----------------------------------------------------------------------------- HF side
class HF:
    def __init__(self, cfg: ModelConfig, threads: int):
        import torch
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        v, t = cfg.vision, cfg.text
        vision = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                  num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                                  image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act,
                                  layer_norm_eps=v.layer_norm_eps, num_channels=v.num_channels)
        text = LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                           num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                           num_key_value_heads=t.num_kv_heads, rms_norm_eps=t.rms_norm_eps,
                           rope_theta=t.rope_theta, max_position_embeddings=t.max_position_embeddings,
                           tie_word_embeddings=t.tie_word_embeddings, bos_token_id=t.bos_token_id,
                           eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id)
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=cfg.image_token_id,
                             image_seq_length=cfg.num_image_tokens, projector_hidden_act="gelu",
                             vision_feature_layer=cfg.vision_feature_layer,
                             vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        self.torch = torch
        self.model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                                dtype=torch.float32)
        self.model.model.vision_tower.requires_grad_(False)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        try:
            self.opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                         weight_decay=WEIGHT_DECAY, fused=True)
            self.fused = True
        except (RuntimeError, TypeError):
            self.opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
            self.fused = False
        self.num_trainable = sum(p.numel() for p in trainable)

    def _tensors(self, batch):
        ids, labels, pixels = batch
        t = self.torch
        return t.from_numpy(ids).long(), t.from_numpy(labels).long(), t.from_numpy(pixels.transpose(0, 3, 1, 2).copy())

    def train_runner(self, batch):
        ids, labels, pixels = self._tensors(batch)

        def run():
            self.model.train()
            loss = self.model(input_ids=ids, pixel_values=pixels, labels=labels).loss
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

        return run

    def prefill_runner(self, batch):
        ids, _, pixels = self._tensors(batch)

        def run():
            self.model.eval()
            with self.torch.inference_mode():
                logits = self.model(input_ids=ids, pixel_values=pixels).logits
            assert logits.shape == (*ids.shape, self.model.config.text_config.vocab_size)

        return run

    def generate_runner(self, prompt, max_new: int):
        ids, _, pixels = self._tensors(prompt)
        mask = self.torch.ones_like(ids)

        def run():
            self.model.eval()
            with self.torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                          do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new)
            assert out.shape[1] == ids.shape[1] + max_new

        return run


# ----------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> None:
    quick = args.quick
    wanted = set(args.only or ("train", "prefill", "decode"))
    cfg = ModelConfig.bench_small()
    load = OtherLoad()
    log(f"bench_small float32 | jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device(s), "
        f"{os.cpu_count()} CPU cores) | XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    peak, per_shape = matmul_flops_per_s(3 if quick else 5)
    log("XLA float32 matmul GFLOP/s: " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in per_shape.items()))
    bandwidth = memory_bandwidth(3 if quick else 5)
    per_token = decode_bytes_per_token(cfg)
    bound = bandwidth / per_token
    log(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s; batch-1 decode bound {bound:.0f} tokens/s "
        f"({per_token / 1e6:.0f} MB of LLM weights read per token)")

    ours = Ours(cfg)
    hf = None if args.skip_hf else HF(cfg, args.threads)
    if hf is not None:
        import torch
        log(f"HF: transformers LlavaForConditionalGeneration, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, sdpa attention, AdamW fused={hf.fused}")
    batch = make_batch(cfg, BATCH, SEQ)
    prompt = make_batch(cfg, 1, PROMPT, seed=1)
    tokens = BATCH * SEQ
    result: dict[str, float] = {}

    def measure(name: str, runner: str, *args, iters: int, warmup: int = 1) -> tuple[float, float | None]:
        fns = {"ours": getattr(ours, runner)(*args)}
        if hf is not None:
            fns["hf"] = getattr(hf, runner)(*args)
        log(f"{name}: compiling / warming up, then {iters} timed iterations per side")
        sec = paired(fns, iters, warmup)
        return sec["ours"], sec.get("hf")

    def report(name: str, ours_rate: float, hf_rate: float | None) -> float | None:
        result[f"{name}_ours"] = round(ours_rate, 2)
        line = f"{name:>14}: ours {ours_rate:8.1f} tokens/s"
        if hf_rate is not None:
            result[f"{name}_hf"] = round(hf_rate, 2)
            line += f" | HF {hf_rate:8.1f} tokens/s | ours/HF {ours_rate / hf_rate:5.2f}x"
        print(line, flush=True)
        return None if hf_rate is None else round(ours_rate / hf_rate, 3)

    speedups = {}
    if "train" in wanted:
        sec, hf_sec = measure("train", "train_runner", batch, iters=3 if quick else 5, warmup=2)
        speedups["train_speedup"] = report("train", tokens / sec, hf_sec and tokens / hf_sec)
        flops = train_step_flops(cfg, BATCH, SEQ)
        result["mfu"] = round(flops / sec / peak, 4)
        line = f"{'MFU':>14}: ours {flops / sec / 1e9:.0f} GFLOP/s = {100 * flops / sec / peak:.1f}%"
        if hf_sec:
            result["mfu_hf"] = round(flops / hf_sec / peak, 4)
            line += f" | HF {flops / hf_sec / 1e9:.0f} GFLOP/s = {100 * flops / hf_sec / peak:.1f}%"
        print(line + f" of {peak / 1e9:.0f} GFLOP/s (XLA matmul here); {flops / 1e9:.0f} GFLOP per step", flush=True)
    if "prefill" in wanted:
        sec, hf_sec = measure("prefill", "prefill_runner", batch, iters=3 if quick else 6)
        speedups["prefill_speedup"] = report("prefill", tokens / sec, hf_sec and tokens / hf_sec)
    if "decode" in wanted:
        iters = 3 if quick else 5
        sec, hf_sec = measure("decode", "generate_runner", prompt, NEW_TOKENS, iters=iters)
        first, hf_first = measure("decode (first token only)", "generate_runner", prompt, 1, iters=iters)
        speedups["decode_speedup"] = report("decode", NEW_TOKENS / sec, hf_sec and NEW_TOKENS / hf_sec)
        report("decode_steady", (NEW_TOKENS - 1) / (sec - first), hf_sec and (NEW_TOKENS - 1) / (hf_sec - hf_first))
        result["first_token_s_ours"] = round(first, 4)
        if hf_first:
            result["first_token_s_hf"] = round(hf_first, 4)
        result["decode_bound"] = round(bound, 1)
        print(f"{'decode bound':>14}: {bound:.0f} tokens/s ({bandwidth / 1e9:.1f} GB/s / {per_token / 1e6:.0f} MB "
              f"per token); our steady decode is at {100 * result['decode_steady_ours'] / bound:.0f}% of it, "
              f"first token {1000 * first:.0f} ms" + (f" (HF {1000 * hf_first:.0f} ms)" if hf_first else ""),
              flush=True)
    result["matmul_gflops"] = round(peak / 1e9, 1)
    result["bandwidth_gb_s"] = round(bandwidth / 1e9, 2)
    result["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    result["threads"] = args.threads
    load.record(result)
    print(json.dumps({**speedups, **result}))


if __name__ == "__main__":
    main(ARGS)
