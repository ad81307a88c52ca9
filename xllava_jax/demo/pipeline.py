"""`xllava demo`: the whole X-LLaVA recipe at toy scale, step by step, each step resumable.

  1 synth        `xllava data synth`: images, scene graphs, EN/KO/ZH records, held-out VQA, EN + KO text
  2 tokenizer    a base BPE tokenizer trained on the English text, expanded with Korean pieces
                 (`xllava vocab expand`), and `xllava vocab stats` on both
  3 vision       a tiny CLIP vision tower pretrained contrastively on the image-caption pairs, then frozen
  4 llm_pretrain the LLM on EN + KO text           (configs/llm_pretrain.py:demo)
  5 align        the projector on EN + KO captions  (configs/align.py:demo)
  6 vif          projector + LLM on EN + KO, in three parts (a curriculum): the colour and shape questions
                 alone (vif_attributes), then with the position and yes/no questions added (vif_positions), both
                 as single short questions (configs/vif.py:demo_short); then the four task types (configs/vif.py:demo)
  7 eval         `xllava eval run` + `xllava eval score --benchmark synth_vqa` on the held-out split, EN and KO
  8 report       report.md + report.png: loss curves, vocabulary statistics, accuracy vs baselines, examples

Every step records, next to its outputs, the settings that made them (its own and those of the steps it consumes;
see `records.py`). A step recorded as finished with the run's settings is skipped; one made with other settings (a
`--smoke` run's, say) is redone from scratch, and so is everything downstream. A step killed midway starts again,
except the training stages, which resume from their checkpoints, and the evaluation, which keeps the answers it
wrote: rerunning the same command after an interruption goes on where it stopped. Variants (`--ablation`) drop the
vocabulary expansion, the LLM pretraining or the generated four-task data, as the paper's Table 2 does.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from xllava_jax.config import ModelConfig
from xllava_jax.demo.records import Settings, StepRecord
from xllava_jax.errors import UserError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TASKS_GENERATED = ("object", "location", "atmosphere")  # the mvif-style tasks; "conversation" stands for LLaVA-Instruct
STAGES = ("llm_pretrain", "align", "vif_attributes", "vif_positions", "vif")  # every training stage, in order
STAGE_STEPS = {"llm_pretrain": "pretrain_steps", "align": "align_steps", "vif_attributes": "attribute_steps",
               "vif_positions": "position_steps", "vif": "vif_steps"}  # the DemoSettings field of each stage's steps
# The curriculum's short-question stages: the question kinds of vif_short_{en,ko}.json each one trains on.
SHORT_STAGES = {"vif_attributes": ("colour", "binding_shape", "shape"),
                "vif_positions": ("colour", "binding_shape", "shape", "position", "binding_position", "yes_no")}
SHORT_LAST = "vif_positions"  # its kinds include every other short stage's


class DemoError(UserError):
    """A demo directory or setting the demo cannot use."""


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and step counts. `default()` is what `make demo` runs; `smoke()` checks the plumbing in seconds."""

    images: int = 3000
    heldout: int = 300
    text_lines: int = 4000
    base_vocab: int = 1000
    korean_pieces: int = 800
    clip_steps: int = 300
    clip_batch: int = 128
    pretrain_steps: int = 150
    align_steps: int = 150
    attribute_steps: int = 1500
    position_steps: int = 1200
    vif_steps: int = 1000
    eval_batch: int = 32
    examples: int = 4
    seed: int = 0

    @classmethod
    def smoke(cls) -> DemoSettings:
        return cls(images=40, heldout=8, text_lines=200, base_vocab=400, korean_pieces=100, clip_steps=3,
                   clip_batch=16, pretrain_steps=2, align_steps=2, attribute_steps=2, position_steps=2, vif_steps=2,
                   eval_batch=8, examples=2)


# The presets as the redo message names them: what a record matching one was made with (the seed is set apart).
PRESETS = {name: {key: value for key, value in dataclasses.asdict(preset).items() if key != "seed"}
           for name, preset in (("smoke", DemoSettings.smoke()), ("default", DemoSettings()))}


@dataclass(frozen=True)
class Variant:
    """One row of the ablation: which recipe levers are on."""

    name: str
    expand_vocab: bool = True
    llm_pretrain: bool = True
    generated_data: bool = True


FULL = Variant("full recipe + generated data")
ABLATIONS = (Variant("no vocab expansion, no LLM pretraining", expand_vocab=False, llm_pretrain=False),
             Variant("no LLM pretraining", llm_pretrain=False),
             Variant("full recipe", generated_data=False),
             FULL)


def _slug(variant: Variant) -> str:
    return "".join(c if c.isalnum() else "_" for c in variant.name).strip("_")


class Demo:
    """The demo's directory layout and steps. `out/shared` holds what every variant shares (data, tokenizers,
    vision tower); `out/<variant>` holds a variant's stages, answers and scores."""

    def __init__(self, out: str | Path, settings: DemoSettings, log: Callable[[str], None] = print):
        self.out, self.settings, self.log = Path(out), settings, log
        self.data = self.out / "shared" / "data"
        self.base_tok = self.out / "shared" / "tokenizer_base"
        self.expanded_tok = self.out / "shared" / "tokenizer_expanded"
        self.vision = self.out / "shared" / "vision_tower"
        self.timings: dict[str, float] = {}
        self.matmul_gflops: float | None = None
        self._short_rows: dict[str, int] = {}  # variant name -> the short-question stages' row length

    # ------------------------------------------------------------------------------ shared steps
    def timed(self, name: str, work: Callable[[], object]) -> None:
        """Run `work()` and record its wall time under `name` (seconds, for the report)."""
        start = time.perf_counter()
        work()
        self.timings[name] = round(time.perf_counter() - start, 1)

    def step_settings(self, step: str, variant: Variant | None = None) -> Settings:
        """The settings that make `step`'s outputs ({step: {field: value}}): its own DemoSettings fields and those
        of every step it consumes. A training stage consumes the corpus, the tokenizers, the vision tower (all but
        llm_pretrain) and the variant's stage before it; `eval` the variant's last stage."""
        s = dataclasses.asdict(self.settings)

        def own(*fields: str) -> dict:
            return {field: s[field] for field in fields}

        if step == "synth":
            return {"synth": own("seed", "images", "heldout", "text_lines")}
        if step == "tokenizers":
            return {**self.step_settings("synth"), "tokenizers": own("base_vocab", "korean_pieces")}
        if step == "vision":
            return {**self.step_settings("tokenizers"), "vision": own("seed", "clip_steps", "clip_batch")}
        stages = self.stages(variant)
        if step == "eval":
            return {**self.step_settings(stages[-1], variant), "eval": own("eval_batch")}
        before = stages[: stages.index(step)]
        return {**self.step_settings("tokenizers" if step == "llm_pretrain" else "vision"),
                **(self.step_settings(before[-1], variant) if before else {}),
                step: {**own("seed", STAGE_STEPS[step]), **dataclasses.asdict(variant)}}

    def run_step(self, record: StepRecord, work: Callable[[], object], *, resumable: bool = False) -> None:
        """Run `work()` unless `record` says it finished with these settings: its stale outputs are removed first
        (kept when `resumable` and an interrupted run with these settings made them), and the record is marked
        complete once it returns."""
        if record.done():
            return
        record.start(self.log, PRESETS, resumable=resumable)
        work()
        record.finish()

    def synth(self) -> None:
        from xllava_jax.data.synthetic import synthesize

        def work() -> None:
            s = self.settings
            self.log("1/8 synthetic corpus")
            synthesize(self.data, seed=s.seed, num_images=s.images, num_heldout=s.heldout,
                       image_size=ModelConfig.demo().vision.image_size, text_lines=s.text_lines, progress=True)

        products = [self.data / name for name in ("summary.json", "vif_short_en.json", "vif_short_ko.json")]
        self.run_step(StepRecord("synth", self.out / "shared" / "synth.settings.json", self.step_settings("synth"),
                                 [self.data], products), work)

    def tokenizers(self) -> None:
        shared = self.out / "shared"
        outputs = [self.base_tok, self.expanded_tok, shared / "vocab_stats.json",
                   *(shared / f"tokenizer_text_{lang}.txt" for lang in ("en", "ko"))]
        self.run_step(StepRecord("tokenizers", shared / "tokenizers.settings.json", self.step_settings("tokenizers"),
                                 outputs), self._train_tokenizers)

    def _train_tokenizers(self) -> None:
        from xllava_jax.tokenizer.expand import expand_tokenizer
        from xllava_jax.tokenizer.stats import compute_stats, format_table

        self.log("2/8 tokenizers: a base trained on English, expanded with Korean pieces")
        self.base_tok.mkdir(parents=True)
        english, korean = (self._tokenizer_text(lang) for lang in ("en", "ko"))
        spm.SentencePieceTrainer.train(
            input=str(english), model_prefix=str(self.base_tok / "tokenizer"), model_type="bpe",
            vocab_size=self.settings.base_vocab, byte_fallback=True, split_digits=True, character_coverage=1.0,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, minloglevel=2)
        # A toy vocabulary: the 2,350 KS X 1001 syllables would dwarf its few hundred Korean pieces.
        expand_tokenizer(self.base_tok / "tokenizer.model", self.expanded_tok,
                         train_corpus=[korean], num_new=self.settings.korean_pieces, syllable_coverage=False)
        stats = compute_stats([self.base_tok / "tokenizer.model", self.expanded_tok / "tokenizer.model"],
                              [self.data / "text_en.txt", self.data / "text_ko.txt"])
        self.log(format_table(stats))
        (self.out / "shared" / "vocab_stats.json").write_text(json.dumps(stats, indent=1) + "\n")

    def _tokenizer_text(self, lang: str) -> Path:
        """The text a tokenizer is trained on: the language's pretraining text and its instruction records as
        the model reads them (rendered with the vif template), so template markers and prompt suffixes get
        pieces of their own."""
        from xllava_jax.data import conversation as conv

        path = self.out / "shared" / f"tokenizer_text_{lang}.txt"
        lines = (self.data / f"text_{lang}.txt").read_text(encoding="utf-8").splitlines()
        for record in json.loads((self.data / f"vif_{lang}.json").read_text(encoding="utf-8")):
            turns = [("human" if t["from"] == "human" else "gpt", t["value"]) for t in record["conversations"]]
            pieces = conv.render("llava_llama_2", turns, system="")
            text = conv.template_text(pieces)
            for literal in (conv.IMAGE, "<s>", "</s>", "\n"):
                text = text.replace(literal, " ")
            lines.append(text)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def vision_tower(self) -> None:
        from xllava_jax.demo.vision import pretrain_clip
        from xllava_jax.train.contrastive import ContrastiveConfig

        metrics = self.out / "shared" / "clip_metrics.jsonl"

        def work() -> None:
            self.log("3/8 contrastive pretraining of the vision tower")
            s = self.settings
            history = pretrain_clip(self.data, self.expanded_tok, ModelConfig.demo().vision, self.vision,
                                    cfg=ContrastiveConfig(steps=s.clip_steps, batch_size=s.clip_batch, seed=s.seed),
                                    progress=True)
            with open(metrics, "w") as f:
                f.writelines(json.dumps(h) + "\n" for h in history)

        self.run_step(StepRecord("vision", self.out / "shared" / "vision.settings.json", self.step_settings("vision"),
                                 [self.vision, metrics]), work)

    # ------------------------------------------------------------------------------ per variant
    def stage_config(self, stage: str, variant: Variant, init: str):
        from xllava_jax.train.config import apply_overrides, load_config

        s, d = self.settings, self.data
        tok = self.expanded_tok if variant.expand_vocab else self.base_tok
        overrides = [f"tokenizer={tok}", f"seed={s.seed}", f"init={init}", f"train.steps={self._steps(stage)}"]
        config = f"{CONFIGS / stage}.py:demo"
        if stage == "llm_pretrain":
            overrides.append(f"data.text={d / 'text_en.txt'},{d / 'text_ko.txt'}")
        elif stage == "align":
            overrides += [f"data.corpus={d / 'captions_en.json'},{d / 'captions_ko.json'}", f"data.image_root={d}",
                          f"init_vision={self.vision}"]
        else:
            if stage in SHORT_STAGES:
                config = f"{CONFIGS / 'vif'}.py:demo_short"
            overrides += [f"data.corpus={self._vif_corpus(variant, stage)}", f"data.image_root={d}"]
        cfg = apply_overrides(load_config(config), overrides)
        if stage in SHORT_STAGES:
            # Rows as long as the longest short question under this variant's tokenizer (the last short stage's
            # corpus holds every kind), the same for both stages: one compiled step serves them.
            if variant.name not in self._short_rows:
                widest = apply_overrides(copy.deepcopy(cfg), [f"data.corpus={self._vif_corpus(variant, SHORT_LAST)}"])
                self._short_rows[variant.name] = -(-self._longest_sample(widest) // 4) * 4
            cfg = apply_overrides(cfg, [f"data.max_len={self._short_rows[variant.name]}"])
        return cfg

    @staticmethod
    def _longest_sample(cfg) -> int:
        """Tokens in the longest record of `cfg`'s corpus as the trainer encodes it (image slots included)."""
        from xllava_jax.data.pipeline import encode_record, load_records
        from xllava_jax.train.data import vif_spec
        from xllava_jax.train.stage_config import StageConfig

        config = StageConfig.from_config_dict(cfg)
        spec = dataclasses.replace(vif_spec(config.data, ModelConfig.demo(), config.tokenizer_path()), max_len=10**9)
        records, _ = load_records(list(config.data.corpus))
        return max(len(encode_record(r, spec).input_ids) for r in records)

    def _vif_corpus(self, variant: Variant, stage: str) -> Path:
        """EN + KO records for a vif stage: the four task types ("vif") or a short-question stage's kinds of
        vif_short_{en,ko}.json; those of the conversation task alone for a variant without generated data."""
        name = f"{stage}_train.json" if variant.generated_data else f"{stage}_conversation_only.json"
        path = self.out / "shared" / name
        source = "vif" if stage == "vif" else "vif_short"
        records = []
        for lang in ("en", "ko"):
            records += json.loads((self.data / f"{source}_{lang}.json").read_text(encoding="utf-8"))
        if stage in SHORT_STAGES:
            records = [r for r in records if r["kind"] in SHORT_STAGES[stage]]
        if not variant.generated_data:
            records = [r for r in records if r["task"] not in TASKS_GENERATED]
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")  # always: the corpus may be new
        return path

    def _steps(self, stage: str) -> int:
        """The settings' step count for `stage` (one of STAGES)."""
        return getattr(self.settings, STAGE_STEPS[stage])

    def stages(self, variant: Variant) -> list[str]:
        """The variant's training stages in order; a short-question stage set to 0 steps is left out."""
        return [stage for stage in STAGES if (stage != "llm_pretrain" or variant.llm_pretrain)
                and (stage not in SHORT_STAGES or self._steps(stage) > 0)]

    def train_variant(self, variant: Variant) -> Path:
        """Run the variant's stages (a stage left out by these settings loses the workdir another run left);
        returns its final checkpoint."""
        root = self.out / _slug(variant)
        init = ""
        number = {"llm_pretrain": 4, "align": 5}  # the vif parts are all step 6
        what = {"vif_attributes": "vif: colour and shape questions alone",
                "vif_positions": "vif: colour, shape, position and yes/no questions", "vif": "vif: the four task types"}
        stages = self.stages(variant)
        for stage in (s for s in STAGES if s not in stages and (root / s).exists()):
            self.log(f"removing {stage} ({variant.name}): these settings leave the stage out")
            shutil.rmtree(root / stage)
            (root / f"{stage}.settings.json").unlink(missing_ok=True)
        for stage in stages:
            workdir = root / stage
            record = StepRecord(f"{stage} ({variant.name})", root / f"{stage}.settings.json",
                                self.step_settings(stage, variant), [workdir])
            title = f"{number.get(stage, 6)}/8 {what.get(stage, stage)} ({variant.name})"
            # resumable: the trainer goes on from the checkpoints of an interrupted run with these settings
            self.run_step(record, functools.partial(self._train_stage, title, stage, variant, init, workdir),
                          resumable=True)
            init = str(workdir / "final")
        return Path(init)

    def _train_stage(self, title: str, stage: str, variant: Variant, init: str, workdir: Path) -> None:
        from xllava_jax.train.trainer import train

        self.log(title)
        train(self.stage_config(stage, variant, init), workdir)

    def evaluate(self, variant: Variant, ckpt: Path) -> dict:
        from xllava_jax.eval.runner import RunOptions, run_eval
        from xllava_jax.eval.scorers import score
        from xllava_jax.eval.scorers.common import ScoreRequest
        from xllava_jax.infer.engine import Engine

        root = self.out / _slug(variant) / "eval"
        scores_file = root / "scores.json"

        def work() -> None:
            self.log(f"7/8 evaluation on the held-out split ({variant.name})")
            engine = Engine.load(ckpt, model_id=_slug(variant))
            scores = {}
            for lang in ("en", "ko"):
                questions = self.data / f"vqa_heldout_{lang}.jsonl"
                opts = RunOptions(benchmark="synth_vqa", ckpt=ckpt, data=questions, out=root / lang,
                                  image_root=self.data, batch_size=self.settings.eval_batch, max_new_tokens=8)
                summary = run_eval(opts, engine=engine, process=(0, 1))
                scores[lang] = score(ScoreRequest("synth_vqa", Path(summary["answers"]), questions=questions))
            scores_file.write_text(json.dumps(scores, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

        record = StepRecord(f"eval ({variant.name})", root.with_name("eval.settings.json"),
                            self.step_settings("eval", variant), [root], [scores_file])
        self.run_step(record, work, resumable=True)  # answers an interrupted run wrote are kept (run_eval skips them)
        return json.loads(scores_file.read_text())


def run_demo(out: str | Path, settings: DemoSettings | None = None, *, ablation: bool = False,
             log: Callable[[str], None] = print) -> dict:
    """Run every step (skipping those finished with these settings, redoing those made with others) and write the
    report; returns {"report": path, "results": {variant name: result}, "timings": {step: seconds}}."""
    from xllava_jax.demo.report import write_ablation, write_report
    from xllava_jax.train.flops import matmul_peak_flops

    started = time.perf_counter()
    demo = Demo(out, settings or DemoSettings(), log)
    demo.out.mkdir(parents=True, exist_ok=True)
    # The yardstick the demo's time is quoted against (README): XLA's float32 matmul rate here.
    demo.matmul_gflops = round(matmul_peak_flops() / 1e9, 1)
    log(f"XLA float32 matmul here: {demo.matmul_gflops} GFLOP/s")
    demo.timed("synth", demo.synth)
    demo.timed("tokenizers", demo.tokenizers)
    demo.timed("vision", demo.vision_tower)
    results = {}
    for variant in (ABLATIONS if ablation else (FULL,)):
        start = time.perf_counter()
        ckpt = demo.train_variant(variant)
        demo.timings[f"train: {variant.name}"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        results[variant.name] = {"ckpt": str(ckpt), "scores": demo.evaluate(variant, ckpt),
                                 "dir": _slug(variant), "variant": dataclasses.asdict(variant)}
        demo.timings[f"eval: {variant.name}"] = round(time.perf_counter() - start, 1)
    log("8/8 report")
    demo.timings["total"] = round(time.perf_counter() - started, 1)
    report = write_report(demo, results[FULL.name])
    if ablation:
        write_ablation(demo, results)
    log(f"demo took {demo.timings['total'] / 60:.1f} min at {demo.matmul_gflops} GFLOP/s (XLA float32 matmul)")
    return {"report": str(report), "results": results, "timings": demo.timings, "matmul_gflops": demo.matmul_gflops}
