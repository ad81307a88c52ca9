"""The grain VIF pipeline: shapes, labels, images, bad records, process shards, exact resume."""

import dataclasses
import json

import numpy as np
import pytest
from data_fixtures import assert_restores_exactly, make_vif_corpus, train_tokenizer

from xllava_jax.constants import IGNORE_INDEX
from xllava_jax.data import pipeline
from xllava_jax.data.images import ImageConfig, preprocess
from xllava_jax.data.pipeline import DataError, VifSpec, encode_record, fit_length, load_records, vif_dataset

N_IMG, IMG_ID, SIZE = 4, 499, 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    tok = train_tokenizer(d)
    corpus, root = make_vif_corpus(d, 24)
    spec = VifSpec(tokenizer=str(tok), num_image_tokens=N_IMG, image_token_id=IMG_ID, image_root=str(root),
                   image_size=SIZE, max_len=96, system="Be brief.")
    return d, corpus, root, spec


def test_batches_have_static_shapes_and_exact_labels(setup):
    _, corpus, root, spec = setup
    records, problems = load_records([corpus])
    assert len(records) == 24 and not problems
    it = iter(vif_dataset(records, spec, batch_size=4, seed=1, num_epochs=1))
    batch = next(it)
    assert batch["input_ids"].shape == (4, 96) and batch["input_ids"].dtype == np.int32
    assert batch["pixel_values"].shape == (4, 1, SIZE, SIZE, 3)
    assert batch["skipped"].tolist() == [0, 0, 0, 0]
    # Check one example against the encoder and the image processor directly.
    ids = batch["input_ids"][0]
    n = int(batch["attention_mask"][0].sum())
    match = [r for r in records if encode_record(r, spec).input_ids == ids[:n].tolist()]
    assert len(match) >= 1
    record = match[0]
    np.testing.assert_array_equal(batch["labels"][0][:n], encode_record(record, spec).labels)
    assert (batch["labels"][0][n:] == IGNORE_INDEX).all()
    if record["image"]:
        np.testing.assert_array_equal(batch["pixel_values"][0, 0],
                                      preprocess(root / record["image"], ImageConfig.for_vision(SIZE)))
        assert (ids == IMG_ID).sum() == N_IMG
    else:
        assert (ids == IMG_ID).sum() == 0


def test_two_processes_are_disjoint_and_cover_the_epoch(setup):
    _, corpus, _, spec = setup
    records, _ = load_records([corpus])
    seen = []
    for p in range(2):
        for batch in vif_dataset(records, spec, batch_size=3, seed=5, num_epochs=1, process_index=p,
                                 process_count=2):
            seen += [tuple(row[: m.sum()].tolist()) for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    full = [tuple(encode_record(r, spec).input_ids[: spec.max_len]) for r in records]
    assert sorted(seen) == sorted(full)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_batches(setup, workers):
    _, corpus, _, spec = setup
    records, _ = load_records([corpus])
    ds = vif_dataset(records, spec, batch_size=2, seed=3, num_epochs=2, num_workers=workers)
    assert_restores_exactly(ds, skip=5, take=6)  # runs into the second (reshuffled) epoch


def test_bad_image_is_skipped_counted_or_stops_in_strict_mode(setup, tmp_path, caplog):
    d, corpus, root, spec = setup
    lines = corpus.read_text().splitlines()
    record = json.loads(lines[1])
    (root / "broken.png").write_bytes(b"\x89PNG broken")
    record["image"] = "broken.png"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(record) + "\n")
    records, _ = load_records([bad])
    batch = next(iter(vif_dataset(records, spec, batch_size=1, num_epochs=1)))
    assert batch["skipped"].tolist() == [1] and (batch["labels"] == IGNORE_INDEX).all()
    assert "broken.png" in caplog.text and "bad.jsonl:line 1" in caplog.text
    strict = VifSpec(**{**spec.__dict__, "strict": True})
    with pytest.raises(DataError, match="broken.png"):
        next(iter(vif_dataset(records, strict, batch_size=1, num_epochs=1)))


def test_overlong_samples_truncate_or_drop(setup):
    _, corpus, _, spec = setup
    records, _ = load_records([corpus])
    record = next(r for r in records if r["image"])
    record = {**record, "turns": record["turns"] + [["human", "more " * 60], ["gpt", "yes " * 60]]}
    enc = encode_record(record, spec)
    first_answer_end = next(i for i in range(len(enc.labels) - 1, -1, -1)
                            if enc.labels[i] != IGNORE_INDEX and i < len(enc.labels) // 2)
    short = VifSpec(**{**spec.__dict__, "max_len": first_answer_end + 3})
    batch = next(iter(vif_dataset([record], short, batch_size=1, num_epochs=1)))
    assert batch["truncated"].tolist() == [1] and batch["skipped"].tolist() == [0]
    assert (batch["input_ids"][0] == IMG_ID).sum() == N_IMG
    np.testing.assert_array_equal(batch["labels"][0], enc.labels[: short.max_len])
    dropped = VifSpec(**{**short.__dict__, "overflow": "drop"})
    batch = next(iter(vif_dataset([record], dropped, batch_size=1, num_epochs=1)))
    assert batch["skipped"].tolist() == [1] and (batch["labels"] == IGNORE_INDEX).all()


def test_truncation_never_splits_an_image():
    """A cut inside an image's placeholders moves before them (an image in a later turn)."""
    spec = VifSpec(tokenizer="unused", num_image_tokens=4, image_token_id=9, max_len=7)
    ids = [1, 5, 6, 7, 9, 9, 9, 9, 3, 4]
    labels = [IGNORE_INDEX, IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 3, 4]
    cut_ids, cut_labels, reason = fit_length(ids, labels, spec)
    assert reason is None and cut_ids == [1, 5, 6, 7] and cut_labels == labels[:4]


def test_bad_specs():
    with pytest.raises(DataError, match="overflow"):
        VifSpec(tokenizer="t", num_image_tokens=4, image_token_id=1, overflow="wrap")
    with pytest.raises(DataError, match="no room"):
        VifSpec(tokenizer="t", num_image_tokens=576, image_token_id=1, max_len=500)


def test_truncation_that_leaves_no_answer_is_reported(setup, caplog):
    _, corpus, _, spec = setup
    records, _ = load_records([corpus])
    record = next(r for r in records if r["image"])
    first_answer = encode_record(record, spec).labels.index(next(x for x in encode_record(record, spec).labels
                                                                 if x != IGNORE_INDEX))
    short = VifSpec(**{**spec.__dict__, "max_len": first_answer})
    batch = next(iter(vif_dataset([record], short, batch_size=1, num_epochs=1)))
    assert batch["skipped"].tolist() == [1] and (batch["labels"] == IGNORE_INDEX).all()
    assert "no answer token within max_len" in caplog.text


def _pixel_rows(records, spec, epochs):
    """Every example's (input ids, pixels, skipped), in order, over `epochs` epochs (one reader thread: two
    threads may both decode an image neither finds cached)."""
    rows = []
    for batch in vif_dataset(records, spec, batch_size=4, seed=2, num_epochs=epochs, read_threads=1):
        for i in range(len(batch["input_ids"])):
            rows.append((batch["input_ids"][i].tobytes(), batch["pixel_values"][i].tobytes(), int(batch["skipped"][i])))
    return rows


def test_image_cache_decodes_each_image_once_and_changes_nothing(setup, tmp_path, monkeypatch):
    _, corpus, root, spec = setup
    lines = corpus.read_text().splitlines()
    gone = json.loads(next(line for line in lines if json.loads(line).get("image")))
    gone["image"] = "missing.png"
    mixed = tmp_path / "mixed.jsonl"
    shared = [line for line in lines if json.loads(line).get("image")][:4]  # a second question on four images
    mixed.write_text("\n".join(lines + shared + [json.dumps(gone)]) + "\n")
    records, _ = load_records([mixed])
    loads = []
    real = pipeline.resize_crop
    monkeypatch.setattr(pipeline, "resize_crop", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    monkeypatch.setattr(pipeline, "_IMAGES", pipeline.ImageCache())
    uncached = _pixel_rows(records, dataclasses.replace(spec, image_cache_mb=0), epochs=2)
    with_image = sum(bool((np.frombuffer(ids, np.int32) == IMG_ID).any()) and not skipped
                     for ids, _, skipped in uncached)
    assert len(loads) == with_image > len(set(loads))  # without the cache: once per example
    decoded = set(loads)
    loads.clear()
    cached = _pixel_rows(records, spec, epochs=2)
    assert cached == uncached  # bit for bit, the missing image still skipped (in both epochs)
    assert sum(skipped for *_, skipped in cached) == 2
    assert sorted(loads) == sorted(decoded)  # once per image
    assert len(pipeline._IMAGES) == len(decoded) + 1  # and the missing image's reason


def test_image_cache_drops_the_least_recently_used_past_its_limit():
    cache, calls = pipeline.ImageCache(), []

    def load(key, size):
        return lambda: calls.append(key) or (np.zeros(size, np.uint8), None)

    for key in ("a", "b", "a", "c"):  # room for two 400-byte images: "c" pushes out "b", the least recently used
        cache.get(key, 1000, load(key, 400))
    assert calls == ["a", "b", "c"] and len(cache) == 2
    cache.get("a", 1000, load("a", 400))
    cache.get("b", 1000, load("b", 400))
    assert calls == ["a", "b", "c", "b"]
    cache.get("big", 1000, load("big", 2000))  # larger than the whole limit: returned, not kept
    assert len(cache) == 2 and cache.get("big", 1000, load("big", 2000))[0].nbytes == 2000
    assert calls[-2:] == ["big", "big"]
    with pytest.raises(DataError, match="image_cache_mb"):
        VifSpec(tokenizer="t", num_image_tokens=1, image_token_id=0, image_cache_mb=-1)
