"""ArrayRecord shards and the TFDS builder feed the same pipeline with the same examples; and the package
build: setup.py declares what the code imports, the extras pin what jax pins, a missing extra is named in
one line, and the report gets a font that draws Korean."""

import ast
import functools
import importlib.metadata
import json
import re
import sys
from pathlib import Path

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
    """The TFDS dataset is built and read back (tfds.data_source, array_record) through the same pipeline.
    setup.py declares tensorflow-datasets but not TensorFlow, and test_setup_declares_every_third_party_import
    keeps our code from importing it; run where TensorFlow is not installed (a plain `pip install -e .`),
    this test is what shows that building and reading need none."""
    d, corpus, spec = setup
    summary = build_tfds([corpus], spec.image_root, d / "tfds")
    assert summary["records"] == 12
    records, _ = load_records([corpus])
    good = [r for r in records if r["id"] != "lost"]
    raw = _examples(vif_dataset(good, spec, batch_size=3, num_epochs=1))
    via_tfds = _examples(vif_dataset(tfds_records(d / "tfds"), spec, batch_size=3, num_epochs=1))
    assert raw == via_tfds and len(via_tfds) == 12


# ------------------------------------------------------------------- the package build: setup.py
ROOT = Path(__file__).resolve().parents[1]


def _setup_kwargs() -> dict:
    """install_requires and extras_require as written in setup.py."""
    call = next(node for node in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords
            if kw.arg in ("install_requires", "extras_require")}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\[=<>!~;\s]", requirement, maxsplit=1)[0]).lower()


def _imports(tree: ast.AST, in_function: bool = False):
    """(dotted module, imported inside a function) for every absolute import below tree."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, in_function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module, in_function
        yield from _imports(node, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))


@functools.cache
def _providers() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


@functools.cache
def _distributions(module: str) -> frozenset[str]:
    """The installed distributions that provide module (for a namespace such as google, the one holding it)."""
    top = module.split(".")[0]
    candidates = _providers().get(top, [])
    if len(candidates) > 1:
        prefix = "/".join(module.split(".")[:2]) + "/"
        candidates = [d for d in candidates
                      if any(str(f).startswith(prefix) for f in importlib.metadata.files(d) or [])]
    return frozenset(_name(d) for d in candidates)


def test_setup_declares_every_third_party_import():
    kwargs = _setup_kwargs()
    runtime = {_name(r) for r in kwargs["install_requires"]}
    extras = {_name(r) for reqs in kwargs["extras_require"].values() for r in reqs}
    missing = []
    for path in sorted((ROOT / "xllava_jax").rglob("*.py")):
        for module, lazy in _imports(ast.parse(path.read_text())):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top in ("xllava_jax", "__future__"):
                continue
            dists = _distributions(module)
            assert dists, f"{path}: {module} is not installed here"
            if not dists & (runtime | extras if lazy else runtime):
                missing.append(f"{path.relative_to(ROOT)}: {module} ({', '.join(sorted(dists))})")
    assert not missing, "imported but not declared in setup.py:\n" + "\n".join(missing)


def test_accelerator_and_torch_extras_pin_what_jax_pins():
    extras = _setup_kwargs()["extras_require"]
    jax_extra = {}
    for req in importlib.metadata.requires("jax"):
        if m := re.search(r"""extra == ["'](\w+)["']""", req):
            jax_extra.setdefault(m.group(1), []).append(req.split(";")[0].strip())
    version = importlib.metadata.version("jax")
    assert f"jax=={version}" in _setup_kwargs()["install_requires"]
    libtpu = next(r for r in jax_extra["tpu"] if r.startswith("libtpu"))  # e.g. libtpu==0.0.42.*
    assert libtpu in extras["tpu"], extras["tpu"]
    plugin = next(r for r in jax_extra["cuda12"] if r.startswith("jax-cuda12-plugin"))
    assert plugin == f"jax-cuda12-plugin[with-cuda]<={version},>={version}", plugin
    assert extras["cuda"] == [f"jax-cuda12-plugin[with-cuda]=={version}"]
    assert extras["torch"] == ["torch==2.13.0"]  # exact: a range pulls a multi-GB CUDA build


def test_bin_weights_without_torch_name_the_extra_in_one_line(tmp_path, monkeypatch, capsys):
    from xllava_jax.cli import main as cli

    src = tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32, "hidden_size": 16,
                                                 "intermediate_size": 32, "num_hidden_layers": 1,
                                                 "num_attention_heads": 2}))
    (src / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails as it does without torch installed
    assert cli(["convert", "hf2jax", "--src", str(src), "--out", str(tmp_path / "out"), "--allow-bin"]) == 2
    err = capsys.readouterr().err  # besides the message: the "reading" progress bar, open when it came
    errors = [line[line.index("xllava: error: "):] for line in err.splitlines() if "xllava: error: " in line]
    assert len(errors) == 1 and 'pip install -e ".[torch]"' in errors[0], err
    assert "Traceback" not in err and "ModuleNotFoundError" not in err, err


def test_report_font_draws_hangul(tmp_path):
    import warnings

    import matplotlib.pyplot as plt
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    from xllava_jax.demo.report import _hangul_font

    family = _hangul_font()
    assert family, "no font with Hangul for report.png"
    path = font_manager.findfont(family, fallback_to_default=False)
    assert all(ord(c) in FT2Font(path).get_charmap() for c in "이 사진을 설명해 주세요")
    with plt.rc_context({"font.family": [family, "DejaVu Sans"]}), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = plt.figure(figsize=(2, 1))
        fig.text(0, 0.5, "✓ 빨간색 하트 (gold red)")
        fig.savefig(tmp_path / "hangul.png")
        plt.close(fig)
    assert not [str(w.message) for w in caught if "missing from" in str(w.message)]
