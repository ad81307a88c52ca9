"""Packed VIF rows (`data.pack`): the first-fit-decreasing plan, what a row holds, exact resume mid-window,
skipped records, the trainer's wiring, and the model's per-token losses, loss and gradients on a packed
batch against the same records run one per row, on every CPU-testable attention path."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_fixtures import WORDS_EN, assert_restores_exactly, make_vif_corpus, train_tokenizer
from flax import nnx
from PIL import Image, ImageDraw

from xllava_jax.config import ModelConfig
from xllava_jax.constants import IGNORE_INDEX
from xllava_jax.data.images import ImageConfig, preprocess
from xllava_jax.data.packing import MIN_TEXT_TOKENS, default_images_per_row, pack_row, plan_rows
from xllava_jax.data.pipeline import DataError, VifSpec, batch_shapes, encode_record, load_records, vif_dataset
from xllava_jax.models.loss import shifted_targets
from xllava_jax.models.xllava import XLlava
from xllava_jax.train.step import forward_loss_sum

N_IMG, IMG_ID, SIZE = 4, 499, 16
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("pack")
    tok = train_tokenizer(d)
    corpus, root = make_vif_corpus(d, 24)
    spec = VifSpec(tokenizer=str(tok), num_image_tokens=N_IMG, image_token_id=IMG_ID, image_root=str(root),
                   image_size=SIZE, max_len=256, system="Be brief.", pack=True, images_per_row=2, pack_window=7)
    records, problems = load_records([corpus])
    assert not problems
    return d, records, root, spec


def rows_of(batches) -> list[dict[str, np.ndarray]]:
    return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]


def segments_of(row: dict[str, np.ndarray]):
    """(segment id, its token slice) of a packed row, in order."""
    seg = row["segment_ids"]
    for s in range(1, int(seg.max()) + 1):
        where = np.flatnonzero(seg == s)
        assert len(where) and (np.diff(where) == 1).all(), f"segment {s} is not one contiguous run"
        yield s, slice(int(where[0]), int(where[-1]) + 1)


# --------------------------------------------------------------------------------------------- plan
def test_first_fit_decreasing_respects_tokens_and_image_slots():
    lengths = [5, 4, 3, 3, 2, 1, 6, 0]
    images = [1, 1, 1, 0, 1, 0, 0, 0]
    rows = plan_rows(lengths, images, max_len=8, images_per_row=2)
    # Longest first, each into the first row with room: 6 -> A; 5 -> B; 4 -> C; 3 (image) -> B; 3 -> C;
    # 2 (image) -> A; 1 -> C. Rows list their examples in stream order.
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 4, 5, 6]     # each once; length 0 in none
    for row in rows:
        assert sum(lengths[i] for i in row) <= 8 and sum(images[i] for i in row) <= 2 and row == sorted(row)
    assert rows == [[4, 6], [0, 2], [1, 3, 5]]
    assert plan_rows(lengths, images, 8, 2) == rows                             # deterministic
    assert plan_rows([3, 3, 3], [1, 1, 1], 100, 1) == [[0], [1], [2]]           # one slot: one image per row
    with pytest.raises(ValueError, match="cannot fit"):
        plan_rows([9], [0], 8, 2)
    assert default_images_per_row(2048, 576) == 3 and default_images_per_row(1024, 196) == 3
    assert default_images_per_row(64, 576) == 1


def test_a_row_lays_out_segments_with_their_images_and_no_target_across_them():
    def example(ids: list[int], images: int, truncated: int = 0) -> dict[str, np.ndarray]:
        return {"input_ids": np.array(ids, np.int32), "labels": np.array(ids, np.int32),   # every label set
                "pixel_values": np.full((images, 2, 2, 3), ids[0], np.float32), "skipped": np.int32(0),
                "truncated": np.int32(truncated)}

    row = pack_row([example([5, 6, 7], 1), example([8, 9], 0, truncated=1), example([3], 1)], max_len=8,
                   images_per_row=3, image_size=2, pad_id=0, skipped=2)
    assert row["input_ids"].tolist() == [5, 6, 7, 8, 9, 3, 0, 0]
    assert row["labels"].tolist() == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert row["segment_ids"].tolist() == [1, 1, 1, 2, 2, 3, 0, 0]
    assert row["positions"].tolist() == [0, 1, 2, 0, 1, 0, 0, 0]
    assert row["attention_mask"].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert [float(row["pixel_values"][i].max()) for i in range(3)] == [5.0, 3.0, 0.0]
    assert (int(row["skipped"]), int(row["truncated"])) == (2, 1)


# ---------------------------------------------------------------------------------------- rows
def test_packed_rows_hold_every_record_once_with_its_tokens_positions_and_image(setup):
    _, records, root, spec = setup
    rows = rows_of(vif_dataset(records, spec, batch_size=1, seed=2, num_epochs=1))
    unseen = list(records)
    pixels = {r["image"]: preprocess(root / r["image"], ImageConfig.for_vision(SIZE)) for r in records if r["image"]}
    for row in rows:
        assert row["pixel_values"].shape == (2, SIZE, SIZE, 3)
        np.testing.assert_array_equal(row["attention_mask"], row["segment_ids"] > 0)
        assert (row["labels"][row["segment_ids"] == 0] == IGNORE_INDEX).all()
        slot = 0
        for _, span in segments_of(row):
            ids = row["input_ids"][span].tolist()
            # The record with these tokens and, if it has one, the image in the row's next slot.
            record = next(r for r in unseen if encode_record(r, spec).input_ids == ids and
                          (r["image"] is None or np.array_equal(pixels[r["image"]], row["pixel_values"][slot])))
            unseen.remove(record)
            np.testing.assert_array_equal(row["labels"][span], [IGNORE_INDEX] + encode_record(record, spec).labels[1:])
            np.testing.assert_array_equal(row["positions"][span], np.arange(len(ids)))
            slot += record["image"] is not None
        assert not row["pixel_values"][slot:].any()  # unused slots are zeros
        assert row["truncated"] == 0 and row["skipped"] == 0
    assert not unseen
    assert len(rows) <= 2 * len(records) // 3  # about 90 tokens each: two or three to a row of 256


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_window_gives_the_same_batches(setup, workers):
    _, records, _, spec = setup
    ds = vif_dataset(records, spec, batch_size=2, seed=3, num_epochs=3, num_workers=workers)
    assert_restores_exactly(ds, skip=3, take=8)  # across windows (7 records) and into the next (reshuffled) epoch


def test_skipped_records_take_no_room_and_are_counted(setup, tmp_path, caplog):
    _, records, root, spec = setup
    (root / "broken.png").write_bytes(b"\x89PNG broken")
    bad_image = {**next(r for r in records if r["image"]), "image": "broken.png", "file": "bad.jsonl",
                 "where": "line 7"}
    too_long = {**records[0], "turns": records[0]["turns"] + [["human", "more " * 200], ["gpt", "yes " * 200]],
                "file": "bad.jsonl", "where": "line 9"}
    drop = dataclasses.replace(spec, overflow="drop", pack_window=64)
    rows = rows_of(vif_dataset(records[:5] + [bad_image, too_long], drop, batch_size=1, num_epochs=1))
    assert sum(int(r["skipped"]) for r in rows) == 2
    assert rows[0]["skipped"] == 2                       # on the window's first row
    assert sum(int(r["segment_ids"].max()) for r in rows) == 5
    assert "bad.jsonl:line 7" in caplog.text and "broken.png" in caplog.text and "bad.jsonl:line 9" in caplog.text
    only_bad = rows_of(vif_dataset([bad_image], drop, batch_size=1, num_epochs=1))
    assert len(only_bad) == 1 and only_bad[0]["skipped"] == 1 and not only_bad[0]["attention_mask"].any()
    with pytest.raises(DataError, match="broken.png"):
        next(iter(vif_dataset([bad_image], dataclasses.replace(drop, strict=True), batch_size=1, num_epochs=1)))


def test_overlong_records_are_truncated_and_counted(setup):
    _, records, _, spec = setup
    record = next(r for r in records if r["image"])
    long = {**record, "turns": record["turns"] + [["human", "more " * 30], ["gpt", "yes " * 200]]}
    rows = rows_of(vif_dataset([long] + records[:3], spec, batch_size=1, num_epochs=1))
    assert sum(int(r["truncated"]) for r in rows) == 1
    full = [r for r in rows if r["attention_mask"].all()]
    assert len(full) == 1 and full[0]["segment_ids"].max() == 1 and (full[0]["input_ids"] == IMG_ID).sum() == N_IMG


def test_batch_shapes_describe_the_batches(setup):
    _, records, _, spec = setup
    for s in (spec, dataclasses.replace(spec, pack=False, max_len=96)):
        batch = next(iter(vif_dataset(records, s, batch_size=3, num_epochs=1)))
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == batch_shapes(s, 3)
    auto = dataclasses.replace(spec, images_per_row=0)
    assert batch_shapes(auto, 2)["pixel_values"][0] == (2, 256 // (N_IMG + MIN_TEXT_TOKENS), SIZE, SIZE, 3)


def test_trainer_builds_packed_batches_from_the_config(setup):
    from xllava_jax.train.config import apply_overrides, load_config
    from xllava_jax.train.data import make_data
    from xllava_jax.train.stage_config import StageConfig

    d, _, root, _ = setup
    for preset, packed in (("demo", False), ("xllava_13b", True), ("xllava_13b_lora", True)):
        assert load_config(f"{CONFIGS}/vif.py:{preset}").data.pack is packed
    assert load_config(f"{CONFIGS}/align.py:xllava_13b").data.pack
    config = apply_overrides(load_config(f"{CONFIGS}/vif.py:demo"), [
        f"tokenizer={d / 'tokenizer.model'}", f"data.corpus={d / 'corpus.jsonl'}", f"data.image_root={root}",
        "data.pack=true", "data.max_len=256", "data.images_per_row=3", "data.pack_window=16"])
    cfg = ModelConfig.tiny(text=dataclasses.replace(ModelConfig.tiny().text, vocab_size=501), image_token_id=500)
    data, problems = make_data(StageConfig.from_config_dict(config), cfg, 2)
    batch = next(data)
    assert not problems and batch["pixel_values"].shape == (2, 3, 32, 32, 3)
    assert batch["segment_ids"].max() >= 2 and batch["positions"].shape == (2, 256)


# --------------------------------------------------------------------------- model equivalence
@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Short records, with and without an image (32 px), that pack two or three to a row of 128 tokens."""
    d = tmp_path_factory.mktemp("mixed")
    tok = train_tokenizer(d)
    (d / "images").mkdir()
    rng = random.Random(8)  # packs a row as image, text-only, text-only
    lines = []
    for i, with_image in enumerate([1, 0, 1, 1, 0, 1, 0, 0, 1, 0]):
        record = {"id": f"m{i}", "conversations": [
            {"from": "human", "value": ("<image>\n" if with_image else "") + "What is there?"},
            {"from": "gpt", "value": " ".join(rng.choice(WORDS_EN) for _ in range(rng.randint(1, 14)))}]}
        if with_image:
            img = Image.new("RGB", (40, 30), tuple(rng.randrange(256) for _ in range(3)))
            ImageDraw.Draw(img).rectangle((4, 4, 20, 20), fill="blue")
            img.save(d / "images" / f"{i}.png")
            record["image"] = f"{i}.png"
        lines.append(json.dumps(record))
    (d / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    records, _ = load_records([d / "mixed.jsonl"])
    spec = VifSpec(tokenizer=str(tok), num_image_tokens=16, image_token_id=500, image_root=str(d / "images"),
                   image_size=32, max_len=128, system="", pack=True, images_per_row=3, pack_window=64)
    stack = lambda rows: {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}  # noqa: E731
    packed = stack(rows_of(vif_dataset(records, spec, batch_size=1, num_epochs=1)))
    single = stack(rows_of(vif_dataset(records, dataclasses.replace(spec, pack=False), batch_size=1, num_epochs=1)))
    return packed, single


def token_losses(model, batch) -> jax.Array:
    """Next-token loss at every position float32[B, S] (0 where the target is ignored)."""
    logits = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                   position_ids=batch.get("positions"), segment_ids=batch.get("segment_ids")).astype(jnp.float32)
    targets = shifted_targets(batch["labels"])
    valid = targets != IGNORE_INDEX
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)


@nnx.jit
def losses_and_grads(model, batch):
    """(per-token losses float32[B, S], the train step's mean loss (fused lm_head + loss), its gradients)."""
    def mean_loss(m):
        total, count = forward_loss_sum(m, batch)
        return total / count

    return token_losses(model, batch), *nnx.value_and_grad(mean_loss)(model)


@pytest.mark.parametrize("attention", ["cpu_blocked", "xla", "splash"])
def test_packed_batch_gives_the_losses_and_gradients_of_its_records_one_per_row(mixed, attention):
    packed, single = mixed
    base = ModelConfig.tiny()
    cfg = base.replace(text=dataclasses.replace(base.text, vocab_size=501), image_token_id=500,
                       attention=attention, platform="cpu")
    model = XLlava(cfg, rngs=nnx.Rngs(0))
    rows = [{k: np.asarray(v[i]) for k, v in packed.items()} for i in range(len(packed["input_ids"]))]
    assert len(rows) < len(single["input_ids"])
    assert max(int(r["segment_ids"].max()) for r in rows) >= 3
    # The case where a shift could leak: a row whose last conversation is text-only, after one with an image.
    last_text_only = [r for r in rows if r["segment_ids"].max() > 1 and
                      not (r["input_ids"][r["segment_ids"] == r["segment_ids"].max()] == 500).any()]
    assert last_text_only and any((r["input_ids"] == 500).any() for r in last_text_only)

    (got, loss_p, grads_p), (want, loss_s, grads_s) = (losses_and_grads(model, b) for b in (packed, single))
    got, want = np.asarray(got), np.asarray(want)
    single_ids = [tuple(ids[mask > 0].tolist()) for ids, mask in zip(np.asarray(single["input_ids"]),
                                                                    np.asarray(single["attention_mask"]))]
    matched = []
    for i, row in enumerate(rows):
        for _, span in segments_of(row):
            j = single_ids.index(tuple(row["input_ids"][span].tolist()))
            matched.append(j)
            n = span.stop - span.start
            np.testing.assert_allclose(got[i, span], want[j, :n], rtol=1e-5, atol=1e-5)
    assert sorted(matched) == list(range(len(single_ids)))

    np.testing.assert_allclose(float(loss_p), float(loss_s), rtol=1e-5)
    grads_p, grads_s = (jax.tree.leaves(nnx.to_pure_dict(g)) for g in (grads_p, grads_s))
    scale = max(float(np.abs(g).max()) for g in grads_s)
    for gp, gs in zip(grads_p, grads_s):
        np.testing.assert_allclose(np.asarray(gp), np.asarray(gs), rtol=1e-5, atol=1e-5 * scale)
    if attention == "xla":
        # Without segment ids and positions the same row lets later conversations see earlier ones.
        leaky = {k: v for k, v in packed.items() if k not in ("segment_ids", "positions")}
        assert np.abs(np.asarray(nnx.jit(token_losses)(model, leaky)) - got).max() > 1e-3
