"""`xllava data stats`: the token lengths of a VIF corpus and the padding of its rows, padded or packed.

Lengths count image placeholders and text as the model sees them (`pipeline.encode_record`), without
reading images. Row figures follow the training pipeline: records longer than max_len are cut or
left out under the spec's `overflow` rule (`pipeline.fit_length`), one record per row when padded,
or packed window by window in the order of the pipeline's seeded shuffle (`packing.pad_fractions`).
"""

from __future__ import annotations

import grain
import numpy as np
from tqdm import tqdm

from xllava_jax.data.packing import pad_fractions
from xllava_jax.data.pipeline import VifSpec, encode_record, fit_length

PERCENTILES = (10, 50, 90, 99)


def corpus_stats(records: list[dict], spec: VifSpec, *, seed: int = 0,
                 progress: bool = False) -> tuple[dict, list[str]]:
    """Length distribution and row padding of `records` (from `pipeline.load_records`) under `spec`
    (max_len, overflow; with `spec.pack` also the packed rows: `image_slots`, `pack_window`), and the
    records that max_len leaves out ("file:where (id ...): reason")."""
    raw, lengths, images, problems = [], [], [], []
    for record in tqdm(records, unit="record", desc="tokenising", disable=not progress):
        enc = encode_record(record, spec)
        raw.append(len(enc.input_ids))
        kept, _, reason = fit_length(enc.input_ids, enc.labels, spec)
        if reason is not None:
            problems.append(f"{record.get('file')}:{record.get('where')} (id {record.get('id')}): {reason}")
            lengths.append(0)
            images.append(0)
            continue
        lengths.append(len(kept))
        images.append(sum(t == spec.image_token_id for t in kept) // spec.num_image_tokens)
    edges = [e for e in (2 ** k for k in range(6, 20)) if e < spec.max_len] + [spec.max_len]
    counts = np.histogram(raw, bins=[0] + edges + [max(max(raw), spec.max_len) + 1])[0]
    names = [f"<={edges[0]}"] + [f"{a + 1}-{b}" for a, b in zip(edges, edges[1:])] + [f">{spec.max_len}"]
    out = {"records": len(records), "with_image": sum(r["image"] is not None for r in records),
           "skipped_over_max_len": len(problems), "truncated": sum(0 < n < r for n, r in zip(lengths, raw)),
           "max_len": spec.max_len,
           "tokens": {"mean": round(float(np.mean(raw)), 1), "min": int(min(raw)),
                      **{f"p{p}": int(np.percentile(raw, p)) for p in PERCENTILES}, "max": int(max(raw))},
           "histogram": {name: round(float(c) / len(raw), 4) for name, c in zip(names, counts)}}
    order = list(grain.MapDataset.source(range(len(records))).shuffle(seed=seed))
    kept = [i for i in order if lengths[i] > 0]
    if not kept:
        return out, problems
    figures = pad_fractions([lengths[i] for i in kept], [images[i] for i in kept], spec.max_len,
                            spec.image_slots, spec.pack_window)
    out["pad_fraction_padded"] = round(figures["pad_fraction_padded"], 4)
    out["rows_per_1000_padded"] = figures["rows_per_1000_padded"]
    if spec.pack:
        out.update(pad_fraction_packed=round(figures["pad_fraction_packed"], 4),
                   rows_per_1000_packed=round(figures["rows_per_1000_packed"], 1),
                   images_per_row=spec.image_slots, most_images_in_a_row=figures["most_images_in_a_row"],
                   pack_window=spec.pack_window, seed=seed)
    return out, problems


def format_stats(stats: dict) -> str:
    """The human-readable report of `corpus_stats`."""
    t = stats["tokens"]
    lines = [f"{stats['records']:,} records ({stats['with_image']:,} with an image, "
             f"{stats['records'] - stats['with_image']:,} text-only; {stats.get('problems', 0):,} unusable ones "
             "left out)",
             "tokens per record (image + text): " + ", ".join(f"{k} {v:,}" for k, v in t.items()),
             "  " + "  ".join(f"{k}: {v:.1%}" for k, v in stats["histogram"].items()),
             f"over max_len {stats['max_len']:,}: {stats['truncated']:,} truncated, "
             f"{stats['skipped_over_max_len']:,} skipped"]
    if "pad_fraction_padded" in stats:
        lines.append(f"padded to {stats['max_len']:,}: pad fraction {stats['pad_fraction_padded']:.1%}, "
                     f"{stats['rows_per_1000_padded']:,.0f} rows per 1,000 records")
    if "pad_fraction_packed" in stats:
        lines.append(f"packed ({stats['images_per_row']} image slots per row, window {stats['pack_window']}): pad "
                     f"fraction {stats['pad_fraction_packed']:.1%}, {stats['rows_per_1000_packed']:,.1f} rows per "
                     f"1,000 records, at most {stats['most_images_in_a_row']} images in a row")
    return "\n".join(lines)
