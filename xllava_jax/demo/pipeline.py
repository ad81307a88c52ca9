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

A step whose output exists is skipped, and the training stages resume from their checkpoints, so rerunning
the same command after an interruption goes on where it stopped. Variants (`--ablation`) drop the vocabulary
expansion, the LLM pretraining or the generated four-task data, as the paper's Table 2 does.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from xllava_jax.config import ModelConfig
from xllava_jax.errors import UserError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TASKS_GENERATED = ("object", "location", "atmosphere")  # the mvif-style tasks; "conversation" stands for LLaVA-Instruct
STAGES = ("llm_pretrain", "align", "vif_attributes", "vif_positions", "vif")  # every training stage, in order
# The curriculum's short-question stages: the question kinds of vif_short_{en,ko}.json each one trains on.
SHORT_STAGES = {"vif_attributes": ("colour", "binding_shape", "shape"),
                "vif_positions": ("colour", "binding_shape", "shape", "position", "binding_position", "yes_no")}


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

    # ------------------------------------------------------------------------------ shared steps
    def timed(self, name: str, work: Callable[[], object]) -> None:
        """Run `work()` and record its wall time under `name` (seconds, for the report)."""
        start = time.perf_counter()
        work()
        self.timings[name] = round(time.perf_counter() - start, 1)

    def synth(self) -> None:
        from xllava_jax.data.synthetic import synthesize

        if all((self.data / name).exists() for name in ("summary.json", "vif_short_en.json", "vif_short_ko.json")):
            return
        if self.data.exists():
            shutil.rmtree(self.data)  # an interrupted synthesis, or one from before vif_short: start it again
        s = self.settings
        self.log("1/8 synthetic corpus")
        synthesize(self.data, seed=s.seed, num_images=s.images, num_heldout=s.heldout,
                   image_size=ModelConfig.demo().vision.image_size,
                   text_lines=s.text_lines, progress=True)

    def tokenizers(self) -> None:
        from xllava_jax.tokenizer.expand import expand_tokenizer
        from xllava_jax.tokenizer.stats import compute_stats, format_table

        stats_file = self.out / "shared" / "vocab_stats.json"
        if stats_file.exists():
            return
        self.log("2/8 tokenizers: a base trained on English, expanded with Korean pieces")
        for d in (self.base_tok, self.expanded_tok):
            if d.exists():
                shutil.rmtree(d)
        self.base_tok.mkdir(parents=True)
        english, korean = (self._tokenizer_text(lang) for lang in ("en", "ko"))
        spm.SentencePieceTrainer.train(
            input=str(english), model_prefix=str(self.base_tok / "tokenizer"), model_type="bpe",
            vocab_size=self.settings.base_vocab, byte_fallback=True, split_digits=True, character_coverage=1.0,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, minloglevel=2)
        expand_tokenizer(self.base_tok / "tokenizer.model", self.expanded_tok,
                         train_corpus=[korean], num_new=self.settings.korean_pieces)
        stats = compute_stats([self.base_tok / "tokenizer.model", self.expanded_tok / "tokenizer.model"],
                              [self.data / "text_en.txt", self.data / "text_ko.txt"])
        self.log(format_table(stats))
        stats_file.write_text(json.dumps(stats, indent=1) + "\n")

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
        from xllava_jax.checkpoint import is_checkpoint
        from xllava_jax.demo.vision import pretrain_clip
        from xllava_jax.train.contrastive import ContrastiveConfig

        if is_checkpoint(self.vision):
            return
        if self.vision.exists():
            shutil.rmtree(self.vision)
        self.log("3/8 contrastive pretraining of the vision tower")
        s = self.settings
        history = pretrain_clip(self.data, self.expanded_tok, ModelConfig.demo().vision, self.vision,
                                cfg=ContrastiveConfig(steps=s.clip_steps, batch_size=s.clip_batch, seed=s.seed),
                                progress=True)
        with open(self.out / "shared" / "clip_metrics.jsonl", "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in history)

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
        if stage in SHORT_STAGES:  # room for the longest sample under this variant's tokenizer
            longest = self._longest_sample(cfg)
            if longest > cfg.data.max_len:
                cfg = apply_overrides(cfg, [f"data.max_len={-(-longest // 16) * 16}"])
        return cfg

    @staticmethod
    def _longest_sample(cfg) -> int:
        """Tokens in the longest record of `cfg`'s corpus as the trainer encodes it (image slots included)."""
        from xllava_jax.data.pipeline import VifSpec, encode_record, load_records
        from xllava_jax.train.trainer import system_prompt, tokenizer_path

        model = ModelConfig.demo()
        spec = VifSpec(tokenizer=tokenizer_path(cfg), num_image_tokens=model.num_image_tokens,
                       image_token_id=model.image_token_id, template=cfg.data.template, mode=cfg.data.mode,
                       system=system_prompt(cfg), max_len=10**9)
        records, _ = load_records(cfg.data.corpus.split(","))
        return max(len(encode_record(r, spec).input_ids) for r in records)

    def _vif_corpus(self, variant: Variant, stage: str) -> Path:
        """EN + KO records for a vif stage: the four task types ("vif") or a short-question stage's kinds of
        vif_short_{en,ko}.json; those of the conversation task alone for a variant without generated data."""
        name = f"{stage}_train.json" if variant.generated_data else f"{stage}_conversation_only.json"
        path = self.out / "shared" / name
        if not path.exists():
            source = "vif" if stage == "vif" else "vif_short"
            records = []
            for lang in ("en", "ko"):
                records += json.loads((self.data / f"{source}_{lang}.json").read_text(encoding="utf-8"))
            if stage in SHORT_STAGES:
                records = [r for r in records if r["kind"] in SHORT_STAGES[stage]]
            if not variant.generated_data:
                records = [r for r in records if r["task"] not in TASKS_GENERATED]
            path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        return path

    def _steps(self, stage: str) -> int:
        """The settings' step count for `stage` (one of STAGES)."""
        s = self.settings
        return {"llm_pretrain": s.pretrain_steps, "align": s.align_steps, "vif_attributes": s.attribute_steps,
                "vif_positions": s.position_steps, "vif": s.vif_steps}[stage]

    def stages(self, variant: Variant) -> list[str]:
        """The variant's training stages in order; a short-question stage set to 0 steps is left out."""
        return [stage for stage in STAGES if (stage != "llm_pretrain" or variant.llm_pretrain)
                and (stage not in SHORT_STAGES or self._steps(stage) > 0)]

    def train_variant(self, variant: Variant) -> Path:
        """Run the variant's stages; returns its final checkpoint."""
        from xllava_jax.checkpoint import is_checkpoint
        from xllava_jax.train.trainer import train

        root = self.out / _slug(variant)
        init = ""
        number = {"llm_pretrain": 4, "align": 5}  # the vif parts are all step 6
        what = {"vif_attributes": "vif: colour and shape questions alone",
                "vif_positions": "vif: colour, shape, position and yes/no questions", "vif": "vif: the four task types"}
        for stage in self.stages(variant):
            workdir = root / stage
            final = workdir / "final"
            if not is_checkpoint(final):
                self.log(f"{number.get(stage, 6)}/8 {what.get(stage, stage)} ({variant.name})")
                train(self.stage_config(stage, variant, init), workdir)
            init = str(final)
        return Path(init)

    def evaluate(self, variant: Variant, ckpt: Path) -> dict:
        from xllava_jax.eval.runner import RunOptions, run_eval
        from xllava_jax.eval.scorers import score
        from xllava_jax.eval.scorers.common import ScoreRequest
        from xllava_jax.infer.engine import Engine

        root = self.out / _slug(variant) / "eval"
        scores_file = root / "scores.json"
        if scores_file.exists():
            return json.loads(scores_file.read_text())
        self.log(f"7/8 evaluation on the held-out split ({variant.name})")
        engine = Engine.load(ckpt, model_id=_slug(variant))
        scores = {}
        for lang in ("en", "ko"):
            questions = self.data / f"vqa_heldout_{lang}.jsonl"
            opts = RunOptions(benchmark="synth_vqa", ckpt=ckpt, data=questions, out=root / lang, image_root=self.data,
                              batch_size=self.settings.eval_batch, max_new_tokens=8)
            summary = run_eval(opts, engine=engine, process=(0, 1))
            scores[lang] = score(ScoreRequest("synth_vqa", Path(summary["answers"]), questions=questions))
        scores_file.write_text(json.dumps(scores, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return scores


def run_demo(out: str | Path, settings: DemoSettings | None = None, *, ablation: bool = False,
             log: Callable[[str], None] = print) -> dict:
    """Run every step (skipping finished ones) and write the report; returns {variant name: scores}."""
    from xllava_jax.demo.report import write_ablation, write_report

    demo = Demo(out, settings or DemoSettings(), log)
    demo.out.mkdir(parents=True, exist_ok=True)
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
    report = write_report(demo, results[FULL.name])
    if ablation:
        write_ablation(demo, results)
    return {"report": str(report), "results": results, "timings": demo.timings}
