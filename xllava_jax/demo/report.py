"""The demo's report: report.md + report.png (loss curves, vocabulary statistics, held-out accuracy against the
baselines a model reaches without looking, example images with the model's answers in English and Korean)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from PIL import Image  # noqa: E402

from xllava_jax.demo.pipeline import STAGES  # noqa: E402
from xllava_jax.train.metrics import read_metrics  # noqa: E402

if TYPE_CHECKING:
    from xllava_jax.demo.pipeline import Demo

KIND_ORDER = ("colour", "shape", "count", "position", "binding_shape", "binding_position", "yes_no", "label")
LANG_NAMES = {"en": "English", "ko": "Korean"}


def _hangul_font() -> str | None:
    """A font family that has Hangul glyphs (matplotlib's default has none): Noto Sans KR from the
    pylopdf-fonts-ko requirement, else one the machine has, else None."""
    try:
        from pylopdf_fonts_ko import sans_path
    except ImportError:  # an environment installed before setup.py required it
        pass
    else:
        font_manager.fontManager.addfont(str(sans_path()))
        return font_manager.FontProperties(fname=sans_path()).get_name()
    for font in font_manager.fontManager.ttflist:
        if any(key in font.name for key in ("Noto Sans CJK", "Noto Sans KR", "NanumGothic", "Malgun", "AppleGothic",
                                             "UnDotum", "Baekmuk")):
            return font.name
    return None


def _ratio(acc: float, base: float) -> str:
    return f"{acc / base:.1f}x" if base else "-"


def accuracy_rows(scores: dict) -> list[dict]:
    """One row per (language, kind): accuracy, majority baseline, ratio, name-anything-present shortcut (percent)."""
    rows = []
    for lang, metrics in scores.items():
        kinds = metrics["per_lang"][lang]["kinds"]
        for kind in KIND_ORDER:
            if kind in kinds:
                g = kinds[kind]
                rows.append({"lang": lang, "kind": kind, "questions": g["questions"], "accuracy": g["accuracy"],
                             "majority_baseline": g["majority_baseline"], "majority_answer": g["majority_answer"],
                             "present_shortcut": g.get("present_shortcut")})
    return rows


PRESENT_WORD = {"colour": "colour", "shape": "shape", "binding_shape": "shape", "position": "position",
                "binding_position": "position"}


def verdict(rows: list[dict]) -> list[str]:
    """Plain sentences on what the model learned: kinds at >= 2x their majority baseline in both languages,
    each colour, shape and position score against the shortcut of naming anything present, and the kinds left at
    chance."""
    kinds = [k for k in KIND_ORDER if any(r["kind"] == k for r in rows)]

    def ratio(kind: str) -> list[float]:
        return [r["accuracy"] / r["majority_baseline"] if r["majority_baseline"] else 0.0
                for r in rows if r["kind"] == kind]

    learned = [k for k in kinds if min(ratio(k)) >= 2.0]
    chance = [k for k in kinds if max(ratio(k)) < 1.2]
    lines = [f"- Learned (at least 2x the majority baseline in both languages): {', '.join(learned) or 'nothing'}."]
    for r in rows:
        if r["present_shortcut"] is not None:
            side = "above" if r["accuracy"] > r["present_shortcut"] else "below"
            name = r["kind"].replace("_", " ").capitalize()
            lines.append(f"- {name}, {LANG_NAMES[r['lang']]}: {r['accuracy']:.1f}%, {side} the "
                         f"{r['present_shortcut']:.1f}% of naming any {PRESENT_WORD[r['kind']]} present.")
    lines.append(f"- At chance (under 1.2x the majority baseline): {', '.join(chance) or 'nothing'}.")
    return lines


def _accuracy_table(rows: list[dict]) -> list[str]:
    lines = ["| language | question kind | questions | accuracy % | majority baseline % (answer) | x baseline | "
             "name-anything-present % |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        shortcut = "-" if r["present_shortcut"] is None else f"{r['present_shortcut']:.1f}"
        lines.append(f"| {LANG_NAMES[r['lang']]} | {r['kind']} | {r['questions']} | {r['accuracy']:.1f} | "
                     f"{r['majority_baseline']:.1f} ({r['majority_answer']}) | "
                     f"{_ratio(r['accuracy'], r['majority_baseline'])} | {shortcut} |")
    return lines


def _vocab_lines(stats: dict) -> list[str]:
    lines = ["| text | tokenizer | vocabulary | tokens per character | tokens per word |", "|---|---|---|---|---|"]
    for r in stats["results"]:
        tok = "expanded (+ Korean pieces)" if "expanded" in r["tokenizer"] else "base (English)"
        lines.append(f"| {Path(r['file']).name} | {tok} | {r['vocab_size']} | {r['tokens_per_char']:.3f} | "
                     f"{r['tokens_per_word']:.3f} |")
    return lines


def _examples(demo: Demo, variant_dir: str) -> list[dict]:
    """Held-out images with every question asked about them in both languages: question, gold, answer."""
    by_image: dict[str, list[dict]] = {}
    for lang in ("en", "ko"):
        path = demo.out / variant_dir / "eval" / lang / "answers.jsonl"
        for line in path.read_text(encoding="utf-8").splitlines():
            a = json.loads(line)
            by_image.setdefault(a["image"], []).append(a)
    images = sorted(by_image)[: demo.settings.examples]
    return [{"image": image, "answers": by_image[image]} for image in images]


def _question(answer: dict) -> str:
    return answer["prompt"].split("\n")[0].replace("<image>", "").strip()


def _plot(demo: Demo, variant_dir: str, rows: list[dict], examples: list[dict], stats: dict, out: Path) -> None:
    font = _hangul_font()
    if font:
        plt.rcParams["font.family"] = [font, "DejaVu Sans"]
    else:
        demo.log('report.png: no font with Hangul (pip install -e . installs one, or apt-get install fonts-nanum); '
                 "its examples show the English answers only")
    n_ex = len(examples)
    fig = plt.figure(figsize=(16, 9 + 3.2 * ((n_ex + 1) // 2)))
    grid = fig.add_gridspec(2 + (n_ex + 1) // 2, 4, height_ratios=[3, 3] + [3.2] * ((n_ex + 1) // 2))
    ax = fig.add_subplot(grid[0, :2])
    clip = demo.out / "shared" / "clip_metrics.jsonl"
    if clip.exists():
        hist = [json.loads(line) for line in clip.read_text().splitlines()]
        ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], label="contrastive (vision tower)")
    for stage in STAGES:
        workdir = demo.out / variant_dir / stage
        if (workdir / "metrics.jsonl").exists():
            m = read_metrics(workdir)
            ax.plot([r["step"] for r in m], [r["loss"] for r in m], label=stage)
    ax.set(title="training loss", xlabel="step", ylabel="loss", yscale="log")
    ax.legend()
    for col, lang in enumerate(("en", "ko")):
        ax = fig.add_subplot(grid[1, 2 * col: 2 * col + 2])
        mine = [r for r in rows if r["lang"] == lang]
        xs = range(len(mine))
        ax.bar([x - 0.2 for x in xs], [r["accuracy"] for r in mine], 0.4, label="model")
        ax.bar([x + 0.2 for x in xs], [r["majority_baseline"] for r in mine], 0.4, label="majority answer")
        for x, r in zip(xs, mine):
            if r["present_shortcut"] is not None:
                ax.plot([x - 0.4, x + 0.4], [r["present_shortcut"]] * 2, "k--", lw=1)
        ax.set_xticks(list(xs), [r["kind"] for r in mine], rotation=30, ha="right")
        ax.set(title=f"held-out accuracy, {LANG_NAMES[lang]} (dashed: name anything present)", ylabel="%",
               ylim=(0, 100))
        ax.legend()
    ax = fig.add_subplot(grid[0, 2:])
    labels = [f"{Path(r['file']).stem}\n{'expanded' if 'expanded' in r['tokenizer'] else 'base'}"
              for r in stats["results"]]
    ax.bar(range(len(labels)), [r["tokens_per_char"] for r in stats["results"]], color="tab:green")
    ax.set_xticks(range(len(labels)), labels)
    ax.set(title="tokens per character (vocabulary expansion)", ylabel="tokens / char")
    for i, ex in enumerate(examples):
        ax = fig.add_subplot(grid[2 + i // 2, 2 * (i % 2)])
        ax.imshow(Image.open(demo.data / ex["image"]), interpolation="nearest")
        ax.set_axis_off()
        ax = fig.add_subplot(grid[2 + i // 2, 2 * (i % 2) + 1])
        ax.set_axis_off()
        shown = [a for a in ex["answers"] if font or a["lang"] == "en"]
        text = "\n".join(f"{'✓' if a['text'].strip().lower() == a['answer'].lower() else '✗'} "
                         f"{_question(a)[:48]} -> {a['text'][:18]} (gold {a['answer']})" for a in shown[:14])
        ax.text(0, 1, text, va="top", ha="left", fontsize=7, family=plt.rcParams["font.family"])
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def write_report(demo: Demo, result: dict) -> Path:
    """Write OUT/report/report.md and report.png for one variant's result; returns the markdown path."""
    out = demo.out / "report"
    out.mkdir(parents=True, exist_ok=True)
    variant_dir, scores = result["dir"], result["scores"]
    rows = accuracy_rows(scores)
    examples = _examples(demo, variant_dir)
    stats = json.loads((demo.out / "shared" / "vocab_stats.json").read_text())
    _plot(demo, variant_dir, rows, examples, stats, out / "report.png")
    lines = ["# X-LLaVA at toy scale: what the demo trained and what it learned", "",
             f"Model: `{result['ckpt']}` ({result['variant']['name'] if 'name' in result['variant'] else ''}). "
             "Held-out images show compositions that no training image shows.", "",
             "![report](report.png)", "", "## Held-out accuracy (exact match, greedy)", "",
             f"Overall: English {scores['en']['accuracy']:.1f}%, Korean {scores['ko']['accuracy']:.1f}%. The majority "
             "baseline answers every question of a kind with its most common gold answer; for colour, shape and "
             "position questions, naming anything present in the image (any colour present, say) scores the "
             "shortcut column.", "", *verdict(rows), "",
             *_accuracy_table(rows), "",
             "## Vocabulary expansion", "", *_vocab_lines(stats), "", "## Examples", ""]
    for ex in examples:
        name = Path(ex["image"]).name
        shutil.copyfile(demo.data / ex["image"], out / name)
        lines += [f"![{name}]({name})", "", "| language | question | gold | model |", "|---|---|---|---|"]
        lines += [f"| {a['lang']} | {_question(a)} | {a['answer']} | {a['text']} |" for a in ex["answers"]]
        lines.append("")
    lines += ["## Step timings (seconds)", "", f"XLA float32 matmul rate of this machine: {demo.matmul_gflops} GFLOP/s",
              "", *[f"- {k}: {v}" for k, v in demo.timings.items()], ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_ablation(demo: Demo, results: dict) -> Path:
    """OUT/report/ablation.md (and .json): the paper's Table 2 shape at toy scale."""
    out = demo.out / "report"
    lines = ["# Ablation at toy scale (the paper's Table 2 shape)", "",
             "Held-out exact-match accuracy %, greedy. The paper's columns are BVQA-ko / BVQA-en / GQA; here the "
             "held-out synthetic split in Korean and English, and its binding questions (shape of a named-colour "
             "object, place of a named shape) averaged over both languages.", "",
             "| variant | vocab expansion | LLM pretraining | generated data | Korean | English | binding |",
             "|---|---|---|---|---|---|---|"]
    table = {}
    for name, r in results.items():
        s, v = r["scores"], r["variant"]
        binding = [s[lang]["per_lang"][lang]["kinds"][k]["accuracy"] for lang in ("en", "ko")
                   for k in ("binding_shape", "binding_position") if k in s[lang]["per_lang"][lang]["kinds"]]
        row = {"ko": s["ko"]["accuracy"], "en": s["en"]["accuracy"],
               "binding": round(sum(binding) / len(binding), 2) if binding else None}
        table[name] = row
        mark = {True: "yes", False: "no"}
        lines.append(f"| {name} | {mark[v['expand_vocab']]} | {mark[v['llm_pretrain']]} | {mark[v['generated_data']]} "
                     f"| {row['ko']:.1f} | {row['en']:.1f} | {row['binding'] if row['binding'] is not None else '-'} |")
    path = out / "ablation.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "ablation.json").write_text(json.dumps(table, indent=1) + "\n")
    print("\n".join(lines))
    return path
