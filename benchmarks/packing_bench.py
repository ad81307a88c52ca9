"""Packed align / VIF rows (`data.pack`) against rows padded to max_len: useful tokens per second of the
real train step (`bench_small`, CPU), and the pad fractions of both and of LLaVA's length-grouped batches.

The corpus is drawn token by token to follow the length mix of LLaVA-1.5's 665K instruction set (its
paper's table 7: LLaVA-Instruct 158K, ShareGPT 40K, VQAv2 83K, GQA 72K, OKVQA 9K, OCR-VQA 80K, A-OKVQA
66K, TextCaps 22K, RefCOCO 48K, VG 86K), in four kinds (`KINDS`): short VQA answers (the academic sets,
several questions about one image merged into one conversation, each with LLaVA's "answer with a single
word or phrase" prompt; 70%), multi-turn conversations (9%), detailed descriptions and reasoning (15%),
and text-only conversations (ShareGPT; 6%, often longer than max_len, truncated). Every record has
vicuna_v1's bos + 35-token system prompt and 6 template tokens per round; prompts are ignored and
answers (+ eos) supervised, as the templates do; records with an image hold `num_image_tokens`
placeholders and a 224-px PNG. The records go through the real pipeline (`vif_dataset`, built records,
padded or packed) and the real step (`train.setup.prepare`, vif stage: projector + LLM, AdamW), timed
in alternation on batches spread over the epoch; useful tokens (the non-pad tokens: prompts, images and
answers) per step are the mean over all of the epoch's batches.

LLaVA's reference (`LengthGroupedSampler(group_by_modality_length=True)`, 8 devices x 16 per device, as
LLaVA-1.5's fine-tune): image and text-only records apart, each megabatch of 128 records spread over the
devices by length, each device's batch padded to its longest record. LLaVA orders by a word-count
proxy; here by the exact token count (which can only help it).

Example:
  .venv/bin/python benchmarks/packing_bench.py                  # about 5 minutes on 2 cores
  .venv/bin/python benchmarks/packing_bench.py --max-len 2048 --steps 3
The last line printed is one JSON object with the keys `useful_tokens_ratio` and `pad_fraction_packed`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]
import model_bench as mb  # noqa: E402  (the machine-load probe)

from xllava_jax.data.packing import default_images_per_row, pad_fractions  # noqa: E402

SYSTEM, PER_ROUND, IMAGE_SIZE = 35, 6, 224
# kind: (share, rounds (low, high), question tokens, answer tokens, with an image)
KINDS = {
    "short_vqa": (0.70, (1, 10), (20, 42), (1, 6), True),       # question + the short-answer prompt
    "conversation": (0.09, (2, 6), (8, 30), (20, 150), True),
    "detailed": (0.15, (1, 1), (8, 25), (80, 350), True),
    "text_only": (0.06, (1, 8), (10, 400), (50, 700), False),
}


def draw_corpus(n: int, seed: int = 0) -> list[dict]:
    """n records: kind, prompt / answer token counts per round, whether an image comes first."""
    rng = np.random.default_rng(seed)
    names = list(KINDS)
    kinds = rng.choice(len(names), size=n, p=[KINDS[k][0] for k in names])
    out = []
    for k in kinds:
        _, rounds, q, a, image = KINDS[names[k]]
        # Rounds skew low (most VQA images carry a few questions): the smaller of two uniform draws.
        r = int(min(rng.integers(rounds[0], rounds[1] + 1, size=2)))
        out.append({"kind": names[k], "image": image, "rounds": [(int(rng.integers(q[0], q[1] + 1)) + PER_ROUND,
                                                                 int(rng.integers(a[0], a[1] + 1)) + 1)
                                                                for _ in range(r)]})
    return out


def tokens(record: dict, num_image_tokens: int, image_token_id: int, rng) -> tuple[list[int], list[int]]:
    """input_ids and labels of a drawn record (random text ids; bos 1, eos 2; answers + eos supervised)."""
    ids = [1] + list(rng.integers(3, image_token_id, SYSTEM))
    labels = [-100] * len(ids)
    if record["image"]:
        ids += [image_token_id] * num_image_tokens
        labels += [-100] * num_image_tokens
    for q, a in record["rounds"]:
        prompt, answer = list(rng.integers(3, image_token_id, q)), list(rng.integers(3, image_token_id, a - 1)) + [2]
        ids += prompt + answer
        labels += [-100] * q + answer
    return [int(t) for t in ids], [int(t) for t in labels]


def length(record: dict, num_image_tokens: int) -> int:
    return 1 + SYSTEM + num_image_tokens * record["image"] + sum(q + a for q, a in record["rounds"])


def split_to_even_chunks(indices: list[int], lengths: list[int], num_chunks: int) -> list[list[int]]:
    """LLaVA's (llava/train/llava_trainer.py): a megabatch, longest first, over the devices by total length."""
    if len(indices) % num_chunks:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks, totals = [[] for _ in range(num_chunks)], [0.0] * num_chunks
    for i in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(i)
        totals[shortest] += lengths[i]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def llava_grouped_pad_fraction(lengths: list[int], images: list[int], per_device: int = 16, devices: int = 8,
                               seed: int = 0) -> float:
    """Pad fraction of LLaVA's modality-length-grouped batches (see the module docstring): each device's
    batch padded to its longest record."""
    rng = np.random.default_rng(seed)
    mega = per_device * devices
    padded = used = 0
    for group in ([i for i in range(len(lengths)) if images[i]], [i for i in range(len(lengths)) if not images[i]]):
        group = [group[i] for i in rng.permutation(len(group))]
        for start in range(0, len(group), mega):
            batch = sorted(group[start: start + mega], key=lambda i: -lengths[i])
            for chunk in split_to_even_chunks(batch, lengths, devices):
                if chunk:
                    padded += len(chunk) * max(lengths[i] for i in chunk)
                    used += sum(lengths[i] for i in chunk)
    return 1 - used / padded


def figures(records: list[dict], num_image_tokens: int, max_len: int, images_per_row: int, window: int) -> dict:
    """Pad fractions padded / packed / LLaVA-grouped and packed rows per 1,000 records, one scale."""
    lengths = [min(length(r, num_image_tokens), max_len) for r in records]
    images = [int(r["image"]) for r in records]
    out = pad_fractions(lengths, images, max_len, images_per_row, window)
    out["pad_fraction_llava_grouped"] = llava_grouped_pad_fraction(lengths, images)
    out["mean_tokens"] = float(np.mean(lengths))
    return out


def png_bytes(seed: int) -> bytes:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (320, 240), tuple(int(c) for c in rng.integers(0, 256, 3)))
    ImageDraw.Draw(img).ellipse((40, 30, 200, 190), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def batches(records: list[dict], cfg, tokenizer: str, *, max_len: int, pack: bool, count: int, window: int,
            images_per_row: int) -> tuple[list[dict], float]:
    """`count` batches of 4 rows spread evenly over one epoch of the real pipeline over the drawn records
    (built form), and the mean useful (non-pad) tokens of all the epoch's batches."""
    from xllava_jax.data.pipeline import VifSpec, pack_built, vif_dataset

    rng = np.random.default_rng(1)
    pngs = [png_bytes(i) for i in range(8)]
    payloads = []
    for i, r in enumerate(records):
        ids, labels = tokens(r, cfg.num_image_tokens, cfg.image_token_id, rng)
        payloads.append(pack_built({"id": str(i), "input_ids": ids, "labels": labels,
                                    "image": f"{i}.png" if r["image"] else None},
                                   pngs[i % len(pngs)] if r["image"] else b""))
    spec = VifSpec(tokenizer=tokenizer, num_image_tokens=cfg.num_image_tokens, image_token_id=cfg.image_token_id,
                   image_size=IMAGE_SIZE, max_len=max_len, pack=pack, images_per_row=images_per_row,
                   pack_window=window)
    epoch = lambda: vif_dataset(payloads, spec, batch_size=mb.BATCH, seed=0, num_epochs=1, built=True)  # noqa: E731
    useful = [int(batch["attention_mask"].sum()) for batch in epoch()]   # a first pass counts (pixels not kept)
    picks = set(np.linspace(0, len(useful) - 1, count).round().astype(int).tolist())
    return [batch for i, batch in enumerate(epoch()) if i in picks], float(np.mean(useful))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-len", type=int, default=1024, help="row length of both sides (default: %(default)s)")
    p.add_argument("--records", type=int, default=4000, help="records drawn for the pad fractions (default 4000)")
    p.add_argument("--steps", type=int, default=4, help="timed train steps per side (default 4)")
    p.add_argument("--window", type=int, default=128, help="data.pack_window (default 128)")
    args = p.parse_args(argv)
    load = mb.OtherLoad()
    records = draw_corpus(args.records)
    from xllava_jax.config import ModelConfig

    small = ModelConfig.bench_small()
    slots = default_images_per_row(args.max_len, small.num_image_tokens)
    bench = figures(records, small.num_image_tokens, args.max_len, slots, args.window)
    recipe = figures(records, 576, 2048, default_images_per_row(2048, 576), args.window)
    kinds = {k: sum(r["kind"] == k for r in records) / len(records) for k in KINDS}
    print("mix: " + ", ".join(f"{k} {v:.1%}" for k, v in kinds.items()))
    for name, f, max_len, m in (("bench_small", bench, args.max_len, slots),
                                ("recipe (576 image tokens)", recipe, 2048, default_images_per_row(2048, 576))):
        print(f"{name}, max_len {max_len}, {m} image slots: mean record {f['mean_tokens']:.0f} tokens; pad fraction "
              f"padded {f['pad_fraction_padded']:.1%}, packed {f['pad_fraction_packed']:.1%} "
              f"({f['rows_per_1000_packed']:.0f} rows per 1,000 records), LLaVA length-grouped "
              f"{f['pad_fraction_llava_grouped']:.1%}")

    import jax

    from xllava_jax.train.config import apply_overrides, load_config
    from xllava_jax.train.setup import make_mesh, prepare
    from xllava_jax.train.stage_config import StageConfig

    with tempfile.TemporaryDirectory() as tmp:
        from data_fixtures import train_tokenizer

        tok = str(train_tokenizer(Path(tmp)))   # the pipeline's pad id only: the ids are drawn
        data, mean_useful = {}, {}
        for pack in (True, False):
            data[pack], mean_useful[pack] = batches(records, small, tok, max_len=args.max_len, pack=pack,
                                                    count=args.steps + 1, window=args.window, images_per_row=slots)
    config = StageConfig.from_config_dict(apply_overrides(load_config(str(ROOT / "configs/vif.py:demo")), [
        "model.preset=bench_small", f"train.batch_size={mb.BATCH}", f"data.max_len={args.max_len}",
        "train.warmup_ratio=0.0", "train.schedule=constant"]))
    mesh = make_mesh(config.mesh)
    times = {True: [], False: []}
    with jax.set_mesh(mesh):
        run = prepare(config, mesh)
        state = run.state
        for pack in (True, False):   # compile both shapes, untimed
            state, m = run.step_fn(state, run.frozen, data[pack][0])
            jax.block_until_ready(m)
        for i in range(1, args.steps + 1):
            for pack in (True, False):
                t0 = time.perf_counter()
                state, m = run.step_fn(state, run.frozen, data[pack][i])
                jax.block_until_ready(m)
                times[pack].append(time.perf_counter() - t0)
    # Useful tokens per step: the mean over the epoch's batches; seconds per step: the mean over batches
    # spread evenly over the epoch (the first rows of each packing window are the fullest).
    rate = {pack: mean_useful[pack] / np.mean(times[pack]) for pack in (True, False)}
    for pack, name in ((True, "packed"), (False, "padded")):
        print(f"{name:7s} {rate[pack]:7.1f} useful tokens/s  ({mean_useful[pack]:.0f} useful of "
              f"{mb.BATCH * args.max_len} tokens per step, {np.mean(times[pack]) * 1e3:.0f} ms/step)")
    result = {"useful_tokens_ratio": round(rate[True] / rate[False], 3),
              "pad_fraction_packed": round(bench["pad_fraction_packed"], 4),
              "pad_fraction_padded": round(bench["pad_fraction_padded"], 4),
              "pad_fraction_llava_grouped": round(bench["pad_fraction_llava_grouped"], 4),
              "recipe_pad_fraction_packed": round(recipe["pad_fraction_packed"], 4),
              "recipe_pad_fraction_padded": round(recipe["pad_fraction_padded"], 4),
              "recipe_pad_fraction_llava_grouped": round(recipe["pad_fraction_llava_grouped"], 4),
              "packed_useful_tokens_per_s": round(rate[True], 1), "padded_useful_tokens_per_s": round(rate[False], 1),
              "max_len": args.max_len, "images_per_row": slots, "threads": os.cpu_count()}
    load.record(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
