"""`xllava data build`: VIF corpora -> ArrayRecord shards (tokenised, with encoded image bytes), or a
TFDS dataset in the array_record format that `tfds.data_source` reads without TensorFlow.

ArrayRecord shards hold `pipeline.pack_built` payloads and feed `vif_dataset(..., built=True)`; the
TFDS dataset holds the raw records (id, conversations as JSON, image bytes, lang) and feeds the same
pipeline through `tfds_records`. Bad records are reported, counted and left out of both.
"""

from __future__ import annotations

import json
from pathlib import Path

import grain
import numpy as np
from tqdm import tqdm

from xllava_jax.data.pipeline import VifSpec, encode_record, load_records, pack_built
from xllava_jax.data.vif import Problem, image_problem, resolve_image

BUILD_META = "build.json"


def _usable(paths: list[str | Path], image_root: str | None, strict: bool) -> tuple[list[dict], list[Problem]]:
    records, problems = load_records(paths, strict=strict)
    keep = []
    for r in records:
        reason = image_problem(image_root, r["image"]) if r["image"] is not None else None
        if reason is None:
            keep.append(r)
        else:
            problems.append(Problem(r["file"], r["where"], r["id"], reason))
    return keep, problems


def build_array_record(paths: list[str | Path], spec: VifSpec, out: str | Path, *, num_shards: int = 1,
                       progress: bool = False) -> dict:
    """Tokenise every usable record and write `num_shards` ArrayRecord files + build.json; returns
    the summary (records written, problems by reason)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records, problems = _usable(paths, spec.image_root, spec.strict)
    writers = [ArrayRecordWriter(str(out / f"vif-{i:05d}-of-{num_shards:05d}.array_record"), "group_size:1")
               for i in range(num_shards)]
    for i, record in enumerate(tqdm(records, unit="record", desc="building", disable=not progress)):
        enc = encode_record(record, spec)
        image = resolve_image(spec.image_root, record["image"]).read_bytes() if record["image"] else b""
        meta = {"id": record["id"], "image": record["image"], "lang": record["lang"], "file": record["file"],
                "where": record["where"], "input_ids": enc.input_ids, "labels": enc.labels}
        writers[i % num_shards].write(pack_built(meta, image))
    for w in writers:
        w.close()
    summary = {"records": len(records), "problems": [str(p) for p in problems], "spec": spec.__dict__}
    (out / BUILD_META).write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def array_record_source(directory: str | Path) -> grain.sources.ArrayRecordDataSource:
    files = sorted(str(p) for p in Path(directory).glob("vif-*.array_record"))
    if not files:
        raise FileNotFoundError(f"{directory}: no vif-*.array_record shards (run `xllava data build`)")
    return grain.sources.ArrayRecordDataSource(files)


def _builder_class():
    import tensorflow_datasets as tfds

    class VifCorpus(tfds.core.GeneratorBasedBuilder):
        """A VIF corpus (LLaVA conversation format) with its images embedded."""

        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, *, records: list[dict] | None = None, image_root: str | None = None, **kwargs):
            self._records, self._image_root = records or [], image_root
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(), "conversations": tfds.features.Text(), "lang": tfds.features.Text(),
                "image": tfds.features.Tensor(shape=(), dtype=np.object_)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for r in self._records:
                image = resolve_image(self._image_root, r["image"]).read_bytes() if r["image"] else b""
                yield r["id"], {"id": r["id"], "conversations": json.dumps(r["turns"], ensure_ascii=False),
                                "lang": r["lang"] or "", "image": image}

    return VifCorpus


def build_tfds(paths: list[str | Path], image_root: str | None, data_dir: str | Path, *,
               strict: bool = False) -> dict:
    """Write the usable records as the TFDS dataset `vif_corpus` under data_dir (array_record)."""
    records, problems = _usable(paths, image_root, strict)
    builder = _builder_class()(records=records, image_root=image_root, data_dir=str(data_dir),
                               file_format="array_record")
    builder.download_and_prepare()
    return {"records": len(records), "problems": [str(p) for p in problems]}


def tfds_records(data_dir: str | Path, split: str = "train") -> grain.MapDataset:
    """The TFDS-built corpus as record dicts for `vif_dataset`, read without TensorFlow."""
    import tensorflow_datasets as tfds

    source = tfds.data_source("vif_corpus", split=split, data_dir=str(data_dir))
    return grain.MapDataset.source(source).map(_tfds_to_record)


def _tfds_to_record(ex: dict) -> dict:
    text = {k: ex[k].decode("utf-8") if isinstance(ex[k], bytes) else str(ex[k])
            for k in ("id", "conversations", "lang")}
    image = ex["image"]
    return {"id": text["id"], "turns": json.loads(text["conversations"]), "image": "<embedded>" if image else None,
            "image_bytes": bytes(image) if image else None, "lang": text["lang"] or None,
            "where": f"tfds[{text['id']}]", "file": "vif_corpus"}
