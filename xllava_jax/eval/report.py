"""`xllava eval report`: gather metrics JSON files written by `xllava eval score --out` into the paper's
Table 3 layout (one row per model) plus a table of the other benchmarks; write OUT/report.md and
OUT/report.json and print the markdown."""

from __future__ import annotations

from xllava_jax.eval.answers import ScoreError, read_json

TABLE3 = (("bokvqa_ko", "BVQA-ko"), ("koviz", "KoViz"), ("koliv", "KoLiv"), ("bokvqa_en", "BVQA-en"),
          ("vqav2", "VQAv2"), ("gqa", "GQA"), ("llava_bench", "LLaVA-Bench"), ("pope", "POPE (acc)"))
OTHER = (("kvqa", "KVQA"), ("mmbench", "MMBench"), ("kmmbench", "K-MMBench"), ("kseed", "K-SEED"),
         ("kmmstar", "K-MMStar"), ("kdtcbench", "K-DTCBench"), ("kllava_w", "K-LLaVA-W"), ("synth_vqa", "synth VQA"))
PAPER_RULES = ("paper", "official", "llava")  # the rules the paper's figures were computed under
# XLLAVA.md section 6, Table 3 (accuracy %), in TABLE3's column order; None: not reported.
PAPER_TABLE3 = {
    "LLaVA-1.5 13B": (27.9, 24.4, 33.4, 26.1, 80.0, 63.3, 65.7, 85.9),
    "KoLLaVA 7B": (45.3, 55.9, 54.2, 5.5, None, None, None, None),
    "X-LLaVA 13B": (57.9, 51.3, 61.7, 34.3, 75.5, 64.0, 57.5, 85.5),
}
NOTES = ("POPE (acc) is the mean accuracy over the POPE splits scored (the paper reports accuracy, not F1).",
         "LLaVA-Bench and K-LLaVA-W are the judge's relative scores; multiple-choice figures are circular accuracy.",
         "A figure marked (strict) was scored with `--rules strict`; unmarked ones use the paper's / official "
         "rules. '-' means not scored.")



def load_scores(paths: list[str], models: list[str]) -> list[dict]:
    """Each metrics file as {model, benchmark, value, rules, file}; `models`: none (use each file's model_id),
    one name for all files, or one per file."""
    if models and len(models) not in (1, len(paths)):
        raise ScoreError(f"`models` takes one name or one per `paths` file ({len(paths)}), got {len(models)}")
    entries = []
    for i, path in enumerate(paths):
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("benchmark"), str):
            raise ScoreError(f"{path}: not a metrics JSON object (no `benchmark`)")
        value = data.get("accuracy")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ScoreError(f"{path}: `accuracy` must be a number, got {value!r}")
        model = models[i if len(models) > 1 else 0] if models else str(data.get("model_id") or "unknown model")
        entries.append({"model": model, "benchmark": data["benchmark"], "value": float(value),
                        "rules": str(data.get("rules", "official")), "file": str(path)})
    return entries


def build_report(entries: list[dict], title: str, with_paper: bool) -> dict:
    """The report as data: columns, then our rows (cells {value, rules, file} or None) and the paper's."""
    known = {key for key, _ in TABLE3 + OTHER}
    extra = sorted({e["benchmark"] for e in entries} - known)
    other = [(k, label) for k, label in OTHER if any(e["benchmark"] == k for e in entries)] + [(k, k) for k in extra]
    rows: dict[str, dict] = {}
    for e in entries:
        row = rows.setdefault(e["model"], {"model": e["model"], "source": "ours", "cells": {}})
        if e["benchmark"] in row["cells"]:
            raise ScoreError(f"{e['file']}: a second {e['benchmark']} score for model {e['model']!r} (first: "
                             f"{row['cells'][e['benchmark']]['file']}); name rows apart with `models`")
        row["cells"][e["benchmark"]] = {"value": e["value"], "rules": e["rules"], "file": e["file"]}
    out_rows = [{"model": r["model"], "source": "ours",
                 "table3": {k: r["cells"].get(k) for k, _ in TABLE3},
                 "other": {k: r["cells"].get(k) for k, _ in other}} for r in rows.values()]
    if with_paper:
        out_rows += [{"model": name, "source": "paper (XLLAVA.md Table 3)",
                      "table3": {k: None if v is None else {"value": v, "rules": "paper"}
                                 for (k, _), v in zip(TABLE3, values)},
                      "other": {k: None for k, _ in other}} for name, values in PAPER_TABLE3.items()]
    return {"title": title, "columns": {"table3": [list(c) for c in TABLE3], "other": [list(c) for c in other]},
            "rows": out_rows, "scores": sorted({e["file"] for e in entries}), "notes": list(NOTES)}


def _cell(cell: dict | None, paper: bool) -> str:
    if cell is None:
        return "-"
    text = f"{cell['value']:.1f}" if paper else f"{cell['value']:.2f}"
    return text if cell["rules"] in PAPER_RULES else f"{text} ({cell['rules']})"


def _table(report: dict, part: str) -> list[str]:
    columns = report["columns"][part]
    lines = ["| model | " + " | ".join(label for _, label in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in report["rows"]:
        paper = row["source"] != "ours"
        name = f"paper: {row['model']}" if paper else row["model"]
        lines.append(f"| {name} | " + " | ".join(_cell(row[part][k], paper) for k, _ in columns) + " |")
    return lines


def render_markdown(report: dict) -> str:
    """The report as markdown: Table 3 benchmarks, the other benchmarks (when any), notes, sources."""
    lines = [f"# {report['title']}", "", "## Paper Table 3 benchmarks (accuracy %)", "", *_table(report, "table3")]
    if report["columns"]["other"]:
        lines += ["", "## Other benchmarks (accuracy %)", "", *_table(report, "other")]
    lines += ["", *(f"- {note}" for note in report["notes"]), "", "Scores: " + ", ".join(report["scores"])]
    return "\n".join(lines) + "\n"
