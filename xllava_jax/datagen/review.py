"""The human inspection step: export accepted records for review, import pass/error labels.

`export_review` writes `OUT/review.csv` (columns key, label, note, then the image, task, flags, scene graph
and one column per language) or `OUT/review.html` (the image, flags and all languages side by side).
`import_labels` reads a CSV with `key,label,note` columns (label `pass` or `error`; empty = not reviewed),
stores the labels in `OUT/review_labels.json` and re-exports: error-labelled records leave the LLaVA files
and are listed in the summary's `removed_by_review`.
"""

from __future__ import annotations

import base64
import csv
import html
import os
from pathlib import Path

from xllava_jax.datagen import export as ex
from xllava_jax.datagen.sources import DatagenError

LABELS = ("pass", "error")
_MIME = {".png": "image/png", ".gif": "image/gif", ".webp": "image/webp", ".bmp": "image/bmp"}


def _dialogue(record: dict, lang: str) -> str:
    """The record's turns in `lang` as "Q: ...\\nA: ..." blocks."""
    return "\n\n".join(f"Q: {p['question']}\nA: {p['answer']}" for p in record["response"][lang])


def _flags(record: dict) -> str:
    return "; ".join(f"{f['code']}: {f['detail']}" for f in record.get("flags", ()))


def _graph(record: dict) -> str:
    graph = record["response"].get("scene_graph") or []
    return "; ".join(" - ".join(t) if isinstance(t, list) else str(t) for t in graph)


def _image_src(out: Path, image_root: Path, relpath: str, inline: bool) -> str:
    """The image as a data URL (inline) or as a path relative to the review file."""
    path = image_root / relpath
    if inline:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DatagenError(f"{path}: cannot read image ({e.strerror or e})") from None
        mime = _MIME.get(path.suffix.lower(), "image/jpeg")
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return Path(os.path.relpath(path, out)).as_posix()


def _write_csv(path: Path, records: list[dict], langs: list[str], labels: dict[str, dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "label", "note", "image_id", "task", "image", "flags", "scene_graph", *langs])
        for r in records:
            label = labels.get(r["key"], {})
            writer.writerow([r["key"], label.get("label", ""), label.get("note", ""), r["image_id"], r["task"],
                             r["image"], _flags(r), _graph(r), *(_dialogue(r, lang) for lang in langs)])


def _write_html(path: Path, records: list[dict], langs: list[str], labels: dict[str, dict], image_root: Path,
                inline: bool) -> None:
    esc = html.escape
    rows = []
    for r in records:
        label = labels.get(r["key"], {})
        src = _image_src(path.parent, image_root, r["image"], inline)
        info = (f"<b>{esc(r['key'])}</b><br>{esc(r['task'])}<br><span class=flag>{esc(_flags(r))}</span>"
                f"<br>{esc(_graph(r))}<br><i>{esc(label.get('label', ''))} {esc(label.get('note', ''))}</i>")
        cells = "".join(f"<td><pre>{esc(_dialogue(r, lang))}</pre></td>" for lang in langs)
        rows.append(f"<tr><td><img src=\"{esc(src)}\" loading=lazy></td><td>{info}</td>{cells}</tr>")
    head = "".join(f"<th>{esc(lang)}</th>" for lang in langs)
    path.write_text(
        "<!doctype html><meta charset=utf-8><title>datagen review</title><style>"
        "body{font-family:sans-serif}td{vertical-align:top;border-top:1px solid #ccc;padding:4px}"
        "img{max-width:320px}pre{white-space:pre-wrap;max-width:40em}.flag{color:#b00}</style>"
        f"<p>{len(records)} accepted records. Label them in review.csv (label: pass or error) and run "
        "<code>xllava datagen review --out DIR --import review.csv</code>.</p>"
        f"<table><tr><th>image</th><th>record</th>{head}</tr>{''.join(rows)}</table>\n", encoding="utf-8")


def export_review(out_dir: str | Path, fmt: str = "csv", *, inline_images: bool = False) -> Path:
    """Write OUT/review.csv or OUT/review.html for the accepted records; returns its path."""
    out = Path(out_dir)
    run = ex.read_run(out)
    records = ex.accepted_records(out)
    langs = run["identity"]["langs"]
    labels = ex.read_labels(out)
    if fmt == "csv":
        path = out / "review.csv"
        _write_csv(path, records, langs, labels)
    elif fmt == "html":
        path = out / "review.html"
        _write_html(path, records, langs, labels, Path(run["image_root"]), inline_images)
    else:
        raise DatagenError(f"review format {fmt!r}: choose csv or html")
    return path


def import_labels(out_dir: str | Path, labels_csv: str | Path) -> dict:
    """Apply the pass/error labels of a CSV (`key,label[,note]` columns) and re-export; returns the summary."""
    out, path = Path(out_dir), Path(labels_csv)
    keys = {r["key"] for r in ex.accepted_records(out)}
    labels = ex.read_labels(out)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            if not {"key", "label"} <= set(reader.fieldnames or ()):
                raise DatagenError(f"{path}:1: the header needs key and label columns (and optionally note)")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                label = (row.get("label") or "").strip().lower()
                if not label:
                    continue
                if label not in LABELS:
                    raise DatagenError(f"{where}: label {row['label']!r}: expected pass or error")
                if row.get("key") not in keys:
                    raise DatagenError(f"{where}: key {row.get('key')!r} is not an accepted record of {out}")
                labels[row["key"]] = {"label": label, "note": (row.get("note") or "").strip()}
    except OSError as e:
        raise DatagenError(f"{path}: cannot read ({e.strerror or e})") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise DatagenError(f"{path}: not a readable CSV file ({e})") from None
    ex.write_json(out / ex.LABELS_FILE, labels)
    return ex.export(out)
