"""`xllava demo` end to end at smoke size, its settings records, the contrastive vision pretraining and its hard
negatives."""

import dataclasses
import json
import random
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from xllava_jax.checkpoint import META_FILE, is_checkpoint, load_checkpoint, save_checkpoint
from xllava_jax.cli import main as cli
from xllava_jax.config import ConfigError, ModelConfig, VisionConfig
from xllava_jax.data import synth_phrases as ph
from xllava_jax.data.synth_scenes import Obj, Scene
from xllava_jax.demo.pipeline import ABLATIONS, FULL, STAGES, Demo, DemoSettings, run_demo
from xllava_jax.demo.report import accuracy_rows, verdict
from xllava_jax.demo.vision import hard_negatives
from xllava_jax.eval.questions import read_questions
from xllava_jax.models.vision import VisionTower
from xllava_jax.models.xllava import XLlava
from xllava_jax.train.contrastive import ContrastiveConfig, ContrastiveModel, pack_captions, pretrain_vision_tower
from xllava_jax.train.setup import replace_vision_tower

SMALL_VISION = VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=2)


def _scene(*objects: tuple[str, str, int]) -> Scene:
    return Scene("s", tuple(Obj(shape, colour, "small", cell, (0.0, 0.0), 0.0, None)
                            for shape, colour, cell in objects), "white", "plain")


def _triples(scene: Scene) -> set[tuple[str, str, int]]:
    return {(o.shape, o.colour, o.cell) for o in scene.objects}


def test_hard_negatives_change_binding_or_place_only():
    scene = _scene(("circle", "red", 0), ("square", "blue", 4), ("star", "green", 8))
    rng = random.Random(0)
    for _ in range(20):
        swapped_colour, swapped_shape, moved, recoloured = hard_negatives(scene, rng)
        for neg in (swapped_colour, swapped_shape, moved, recoloured):
            assert _triples(neg) != _triples(scene)
            assert [o.cell for o in neg.objects] == sorted(o.cell for o in neg.objects)  # reading order kept
            assert ph.caption(neg, "en") != ph.caption(scene, "en")
        # swaps keep the sets of colours, shapes and cells: only which goes with which changes
        for neg in (swapped_colour, swapped_shape):
            assert {o.colour for o in neg.objects} == {o.colour for o in scene.objects}
            assert {o.shape for o in neg.objects} == {o.shape for o in scene.objects}
            assert {o.cell for o in neg.objects} == {o.cell for o in scene.objects}
        assert {(o.shape, o.colour) for o in moved.objects} == {(o.shape, o.colour) for o in scene.objects}
        assert len({o.colour for o in recoloured.objects} - {o.colour for o in scene.objects}) == 1
    single = _scene(("heart", "black", 2))
    for neg in hard_negatives(single, rng):
        assert _triples(neg) != _triples(single)


def test_contrastive_pretraining_learns_to_match_images_and_captions():
    """64 images of one coloured square each; the caption names the colour and the cell. After training,
    an image's own caption scores above the others far more often than chance (1/16 per batch)."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 8, 64)
    cells = rng.integers(0, 4, 64)
    palette = rng.uniform(-1.5, 1.5, (8, 3))
    images = np.zeros((64, 16, 16, 3), np.float32)
    for i, (c, cell) in enumerate(zip(colours, cells)):
        r, q = divmod(int(cell), 2)
        images[i, 8 * r: 8 * r + 8, 8 * q: 8 * q + 8] = palette[c]
    captions = [[1, 10 + int(c), 20 + int(cell)] for c, cell in zip(colours, cells)]
    cfg = ContrastiveConfig(steps=60, batch_size=16, lr=3e-3, text_layers=1, embed_dim=32, max_text_len=4)
    tower, history = pretrain_vision_tower(images, captions, 32, SMALL_VISION, cfg)
    assert isinstance(tower, VisionTower) and tower.cfg == SMALL_VISION
    first, last = history[:5], history[-10:]
    assert np.mean([h["loss"] for h in last]) < 0.5 * np.mean([h["loss"] for h in first])
    assert np.mean([h["i2t_acc"] for h in last]) > 0.5
    with pytest.raises(ValueError, match="64 images but 3 captions"):
        pretrain_vision_tower(images, captions[:3], 32, SMALL_VISION, cfg)


def test_packed_captions_embed_as_if_each_were_alone():
    """Several captions share a text row, each attending to itself with its own positions and pooled over its own
    tokens: its embedding equals the one it gets alone in a row (captions longer than max_text_len are cut)."""
    rng = np.random.default_rng(1)
    captions = [rng.integers(1, 40, int(n)).tolist() for n in rng.integers(1, 15, 37)] + [list(range(1, 20))]
    cfg = ContrastiveConfig(text_layers=2, embed_dim=16, max_text_len=12, text_row=24)
    text = pack_captions(captions, cfg.text_row, cfg.max_text_len)
    rows, width = text.ids.shape
    assert width == 24 and rows % 8 == 0 and rows < len(captions) / 2  # 38 captions, two or more to a row
    for i, caption in enumerate(captions):
        where = np.argwhere(text.owner == i)
        assert len(set(where[:, 0])) == 1 and len(where) == min(len(caption), 12)  # whole, in one row, cut to 12
        assert text.ids[text.owner == i].tolist() == caption[:12]
        assert text.positions[text.owner == i].tolist() == list(range(len(where)))
    model = ContrastiveModel(SMALL_VISION, 40, cfg, nnx.Rngs(0))
    together = np.asarray(model.text_embeds(text, len(captions)))
    alone = np.concatenate([np.asarray(model.text_embeds(pack_captions([c], cfg.text_row, cfg.max_text_len), 1))
                            for c in captions])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
    assert np.abs(together[:-1] - together[1:]).max() > 1e-2  # the captions do differ
    with pytest.raises(ValueError, match="text_row"):
        ContrastiveConfig(max_text_len=48, text_row=32)


def test_init_vision_puts_a_trained_tower_over_the_model(tmp_path):
    cfg = ModelConfig.tiny()
    tower = VisionTower(cfg.vision, rngs=nnx.Rngs(7))
    save_checkpoint(tmp_path / "tower", tower)
    model = XLlava(cfg, rngs=nnx.Rngs(0))
    before = nnx.state(model.language_model)
    replace_vision_tower(model, str(tmp_path / "tower"))
    for a, b in zip(jax.tree.leaves(nnx.state(model.vision_tower)), jax.tree.leaves(nnx.state(tower))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(nnx.state(model.language_model)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    save_checkpoint(tmp_path / "other", VisionTower(SMALL_VISION, rngs=nnx.Rngs(0)))
    with pytest.raises(ConfigError, match="does not match the model's"):
        replace_vision_tower(model, str(tmp_path / "other"))
    assert load_checkpoint(tmp_path / "tower")[1]["kind"] == "vision"


@pytest.mark.slow
def test_demo_smoke_runs_every_step_resumes_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--smoke", "--out", str(out), "--ablation"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["accuracy"]) == {v.name for v in ABLATIONS}
    report = out / "report" / "report.md"
    assert summary["report"] == str(report)
    text = report.read_text(encoding="utf-8")
    for needle in ("Held-out accuracy", "majority baseline", "Vocabulary expansion", "| Korean | colour |",
                   "base (English)"):
        assert needle in text
    assert (out / "report" / "report.png").read_bytes().startswith(b"\x89PNG")
    ablation = (out / "report" / "ablation.md").read_text()
    assert all(v.name in ablation for v in ABLATIONS)
    # each variant trained its own stages: no LLM pretraining where the variant drops it
    assert not (out / "no_LLM_pretraining" / "llm_pretrain").exists()
    for stage in ("llm_pretrain", "align", "vif_attributes", "vif_positions", "vif"):
        assert is_checkpoint(out / "full_recipe___generated_data" / stage / "final"), stage
    vocab = json.loads((out / "shared" / "vocab_stats.json").read_text())
    ko = [r for r in vocab["results"] if r["file"].endswith("text_ko.txt")]
    assert ko[1]["tokens_per_char"] < ko[0]["tokens_per_char"]  # the expansion shortens Korean
    scores = json.loads((out / "full_recipe___generated_data" / "eval" / "scores.json").read_text())
    assert scores["ko"]["questions"] == len((out / "shared/data/vqa_heldout_ko.jsonl").read_text().splitlines())

    # a rerun skips every finished step: nothing is trained or answered again
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("answers.jsonl")}
    assert cli(["demo", "--smoke", "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("answers.jsonl")} == stamp
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == {
        k: v for k, v in summary["accuracy"].items() if k == ABLATIONS[-1].name}


def test_demo_vif_starts_on_short_colour_and_shape_questions_then_positions(tmp_path):
    demo = Demo(tmp_path, DemoSettings.smoke(), log=lambda _: None)
    demo.synth()
    (demo.data / "vif_short_ko.json").unlink()  # a corpus synthesised before these files: made again
    demo.synth()
    assert (demo.data / "vif_short_ko.json").exists()
    demo.tokenizers()
    stages = ["llm_pretrain", "align", "vif_attributes", "vif_positions", "vif"]
    assert demo.stages(FULL) == stages and demo.stages(ABLATIONS[0]) == stages[1:]
    assert Demo(tmp_path, DemoSettings(attribute_steps=0, position_steps=0)).stages(FULL) == [
        "llm_pretrain", "align", "vif"]
    first, second, then = (demo.stage_config(stage, FULL, f"{stage}/init") for stage in stages[2:])
    assert (first.init, second.init, then.init) == ("vif_attributes/init", "vif_positions/init", "vif/init")
    assert first.train.batch_size == second.train.batch_size == 3 * then.train.batch_size
    assert first.data.max_len == second.data.max_len < then.data.max_len
    assert {(c.train.lr, c.train.schedule) for c in (first, second, then)} == {(5e-4, "constant")}
    short = [r for lang in ("en", "ko")
             for r in json.loads((demo.data / f"vif_short_{lang}.json").read_text(encoding="utf-8"))]
    attributes, positions = (json.loads(Path(c.data.corpus).read_text(encoding="utf-8")) for c in (first, second))
    assert attributes == [r for r in short if r["kind"] in ("colour", "binding_shape", "shape")]
    assert positions == [r for r in short if r["kind"] not in ("count", "label")]
    assert 0 < len(attributes) < len(positions) < len(short)
    # every sample fits whole, under the expanded tokenizer and under the base one (Korean in bytes: longer)
    assert demo._longest_sample(second) <= second.data.max_len < demo._longest_sample(second) + 4  # no wider
    base = demo.stage_config("vif_positions", ABLATIONS[0], "a")
    assert second.data.max_len < demo._longest_sample(base) <= base.data.max_len
    # without the generated data: the conversation task's questions only
    own = demo.stage_config("vif_attributes", ABLATIONS[2], "a")
    tasks = Counter(r["task"] for r in json.loads(Path(own.data.corpus).read_text(encoding="utf-8")))
    assert set(tasks) == {"conversation"} and 0 < tasks.total() < len(attributes)


def test_report_verdict_names_what_was_learned_and_the_colour_shortcut():
    def kinds(colour, count):
        return {"colour": {"accuracy": colour, "questions": 10, "majority_answer": "red", "majority_baseline": 20.0,
                           "present_shortcut": 50.0},
                "count": {"accuracy": count, "questions": 10, "majority_answer": "2", "majority_baseline": 25.0},
                "binding_position": {"accuracy": 30.0, "questions": 10, "majority_answer": "top",
                                     "majority_baseline": 10.0, "present_shortcut": 40.0}}

    scores = {lang: {"per_lang": {lang: {"kinds": kinds(*values)}}}
              for lang, values in (("en", (60.0, 80.0)), ("ko", (45.0, 40.0)))}
    lines = verdict(accuracy_rows(scores))
    assert lines[0] == "- Learned (at least 2x the majority baseline in both languages): colour, binding_position."
    assert "- Colour, English: 60.0%, above the 50.0% of naming any colour present." in lines
    assert "- Colour, Korean: 45.0%, below the 50.0% of naming any colour present." in lines
    assert "- Binding position, Korean: 30.0%, below the 40.0% of naming any position present." in lines
    assert lines[-1] == "- At chance (under 1.2x the majority baseline): nothing."


class _Killed(Exception):
    """Stands for a demo run killed in the middle of a step."""


def _instant_expensive_steps(monkeypatch, kill: set[str]) -> list[tuple[str, list[str]]]:
    """Replace the vision pretraining, the trainer and the answering with instant stand-ins that write what the real
    ones write (a vision checkpoint; a workdir with checkpoints/, metrics.jsonl and a final checkpoint, whose
    metadata holds its step count; answers.jsonl). A stage
    named in `kill` stops after its first checkpoint, once; a model answers its first `train.steps` questions right.
    Returns the calls made: (step, what its output directory held when the call began)."""
    calls: list[tuple[str, list[str]]] = []

    def held(path: Path) -> list[str]:
        return sorted(p.name for p in path.iterdir()) if path.exists() else []

    def pretrain_clip(data_dir, tokenizer, vision_cfg, out, **_) -> list[dict]:
        calls.append(("vision", held(Path(out))))
        Path(out).mkdir(parents=True)
        (Path(out) / META_FILE).write_text("{}")
        return [{"step": 1, "loss": 1.0}]

    def train(config, workdir) -> Path:
        workdir = Path(workdir)
        calls.append((workdir.name, held(workdir)))
        (workdir / "checkpoints").mkdir(parents=True, exist_ok=True)
        if workdir.name in kill:
            kill.remove(workdir.name)
            raise _Killed(workdir.name)
        rows = [{"step": i + 1, "loss": 1 / (i + 1)} for i in range(config.train.steps)]
        (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (workdir / "final").mkdir(exist_ok=True)
        (workdir / "final" / META_FILE).write_text(json.dumps({"steps": config.train.steps}))
        return workdir / "final"

    def run_eval(opts, **_) -> dict:
        out = Path(opts.out)
        calls.append(("eval", held(out)))
        right = json.loads((Path(opts.ckpt) / META_FILE).read_text())["steps"]
        questions = read_questions(opts.data, "synth_vqa", image_root=opts.image_root)
        out.mkdir(parents=True, exist_ok=True)
        lines = [{"question_id": q.question_id, "prompt": q.prompt, "text": q.fields["answer"] if i < right else "-",
                  **q.fields} for i, q in enumerate(questions)]
        (out / "answers.jsonl").write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in lines),
                                           encoding="utf-8")
        return {"answers": str(out / "answers.jsonl")}

    monkeypatch.setattr("xllava_jax.demo.vision.pretrain_clip", pretrain_clip)
    monkeypatch.setattr("xllava_jax.train.trainer.train", train)
    monkeypatch.setattr("xllava_jax.eval.runner.run_eval", run_eval)
    monkeypatch.setattr("xllava_jax.infer.engine.Engine.load", classmethod(lambda cls, *args, **kwargs: None))
    return calls


def _said(logs: list[str]) -> list[str]:
    """The step and redo lines of a run's log (the tokenizer table and font notes left out)."""
    return [line for line in logs if line[:1].isdigit() or line.startswith(("redoing", "removing"))]


def _redone(settings: str, *steps: str) -> list[str]:
    return [f"redoing {step}: its outputs were made with other settings ({settings})" for step in steps]


def test_demo_redoes_the_steps_other_settings_made_and_skips_those_the_same_settings_made(tmp_path, monkeypatch):
    calls = _instant_expensive_steps(monkeypatch, kill=set())
    out, full, smoke = tmp_path / "demo", f"({FULL.name})", DemoSettings.smoke()

    def run(settings: DemoSettings) -> tuple[dict, list[str]]:
        calls.clear()
        logs: list[str] = []
        return run_demo(out, settings, log=logs.append), logs

    first, _ = run(smoke)
    assert calls == [("vision", []), *((stage, []) for stage in STAGES), ("eval", []), ("eval", [])]

    # the same settings: every step is skipped
    again, logs = run(smoke)
    assert calls == [] and _said(logs) == ["8/8 report"]
    assert again["results"][FULL.name]["scores"] == first["results"][FULL.name]["scores"]

    # a later stage's step count changes: that stage and the evaluation are redone from scratch, the rest is kept
    longer = dataclasses.replace(smoke, vif_steps=3)
    second, logs = run(longer)
    assert calls == [("vif", []), ("eval", []), ("eval", [])]  # the stale workdir was cleared, not resumed
    assert _said(logs) == [*_redone("smoke", f"vif {full}"), f"6/8 vif: the four task types {full}",
                           *_redone("smoke", f"eval {full}"), f"7/8 evaluation on the held-out split {full}",
                           "8/8 report"]
    scores, before = second["results"][FULL.name]["scores"], first["results"][FULL.name]["scores"]
    assert scores["en"]["accuracy"] > before["en"]["accuracy"]
    report = (out / "report" / "report.md").read_text(encoding="utf-8")
    assert f"Overall: English {scores['en']['accuracy']:.1f}%, Korean {scores['ko']['accuracy']:.1f}%" in report
    assert len((out / "full_recipe___generated_data" / "vif" / "metrics.jsonl").read_text().splitlines()) == 3

    # the corpus changes: it and everything downstream of it are redone, each stage in an empty workdir
    bigger = dataclasses.replace(longer, images=48)
    _, logs = run(bigger)
    assert calls == [("vision", []), *((stage, []) for stage in STAGES), ("eval", []), ("eval", [])]
    assert [line for line in logs if line.startswith("redoing")] == [
        *_redone("smoke", "synth", "tokenizers", "vision", *(f"{stage} {full}" for stage in STAGES[:-1])),
        *_redone("images=40", f"vif {full}", f"eval {full}")]
    assert len((out / "shared" / "data" / "scene_graphs.jsonl").read_text().splitlines()) == 48 + smoke.heldout

    # a stage left out: its workdir goes (the report would plot it), and the stages after it are redone
    _, logs = run(dataclasses.replace(bigger, attribute_steps=0))
    assert calls == [("vif_positions", []), ("vif", []), ("eval", []), ("eval", [])]
    assert f"removing vif_attributes {full}: these settings leave the stage out" in logs
    assert _redone("attribute_steps=2", f"vif_positions {full}")[0] in logs
    assert not list((out / "full_recipe___generated_data").glob("vif_attributes*"))


def test_demo_resumes_a_step_killed_midway_with_the_same_settings_only(tmp_path, monkeypatch):
    kill = {"align"}
    calls = _instant_expensive_steps(monkeypatch, kill)
    out, smoke, logs = tmp_path / "demo", DemoSettings.smoke(), []

    def run(settings: DemoSettings) -> None:
        calls.clear()
        logs.clear()
        run_demo(out, settings, log=logs.append)

    with pytest.raises(_Killed):
        run(smoke)
    # the same settings: the stages done are skipped, the killed one goes on from its checkpoints
    kill.add("vif")
    with pytest.raises(_Killed):
        run(smoke)
    assert calls == [("align", ["checkpoints"]), ("vif_attributes", []), ("vif_positions", []), ("vif", [])]
    assert not [line for line in logs if line.startswith("redoing")]
    # other settings: the killed stage's checkpoints came from the old ones, so it starts again in an empty workdir
    run(dataclasses.replace(smoke, vif_steps=3))
    assert calls[0] == ("vif", []) and _redone("smoke", f"vif ({FULL.name})")[0] in logs

    # outputs without records (a demo directory from before the records): redone, as made with unknown settings
    for record in out.rglob("*.settings.json"):
        record.unlink()
    run(smoke)
    assert calls == [("vision", []), *((stage, []) for stage in STAGES), ("eval", []), ("eval", [])]
    assert _redone("unrecorded", "synth")[0] in logs
