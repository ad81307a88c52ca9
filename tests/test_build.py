"""ArrayRecord shards and the TFDS builder feed the same pipeline with the same examples."""

import importlib.util
import json

import pytest
from data_fixtures import make_vif_corpus, train_tokenizer

from xllava_jax.data.build import array_record_source, build_array_record, build_tfds, tfds_records
from xllava_jax.data.pipeline import VifSpec, load_records, vif_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("build")
    tok = train_tokenizer(d)
    corpus, root = make_vif_corpus(d, 12)
    with corpus.open("a") as f:  # one record whose image is missing: reported, left out
        f.write(json.dumps({"id": "lost", "image": "nope.png", "conversations": [
            {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}) + "\n")
    spec = VifSpec(tokenizer=str(tok), num_image_tokens=4, image_token_id=499, image_root=str(root),
                   image_size=16, max_len=96, system="Be brief.")
    return d, corpus, spec


def _examples(ds):
    out = []
    for batch in ds:
        for i in range(len(batch["input_ids"])):
            out.append((batch["input_ids"][i].tobytes(), batch["labels"][i].tobytes(),
                        batch["pixel_values"][i].tobytes()))
    return sorted(out)


def test_array_record_build_matches_raw_pipeline(setup):
    d, corpus, spec = setup
    summary = build_array_record([corpus], spec, d / "ar", num_shards=3)
    assert summary["records"] == 12 and len(summary["problems"]) == 1 and "nope.png" in summary["problems"][0]
    assert len(list((d / "ar").glob("vif-*.array_record"))) == 3
    records, _ = load_records([corpus])
    good = [r for r in records if r["id"] != "lost"]
    raw = _examples(vif_dataset(good, spec, batch_size=2, num_epochs=1))
    built = _examples(vif_dataset(array_record_source(d / "ar"), spec, batch_size=2, num_epochs=1, built=True))
    assert raw == built and len(raw) == 12


def test_tfds_build_reads_without_tensorflow(setup):
    d, corpus, spec = setup
    summary = build_tfds([corpus], spec.image_root, d / "tfds")
    assert summary["records"] == 12
    records, _ = load_records([corpus])
    good = [r for r in records if r["id"] != "lost"]
    raw = _examples(vif_dataset(good, spec, batch_size=3, num_epochs=1))
    via_tfds = _examples(vif_dataset(tfds_records(d / "tfds"), spec, batch_size=3, num_epochs=1))
    assert raw == via_tfds and len(via_tfds) == 12
    assert importlib.util.find_spec("tensorflow") is None  # read with TensorFlow absent
