"""`xllava eval report`: Table 3 layout, rules notes, other benchmarks, paper rows, bad input."""

import json

from xllava_jax.cli import main as cli


def write_scores(directory, **files):
    paths = []
    for name, metrics in files.items():
        path = directory / f"{name}.json"
        path.write_text(json.dumps(metrics, ensure_ascii=False))
        paths.append(str(path))
    return paths


def metrics(benchmark, accuracy, model="ours", rules="official", **extra):
    return {"benchmark": benchmark, "accuracy": accuracy, "model_id": model, "rules": rules, **extra}


def test_report_tables_files_and_paper_rows(tmp_path, capsys):
    paths = write_scores(
        tmp_path,
        bok=metrics("bokvqa_ko", 57.9, rules="paper"),
        koviz=metrics("koviz", 40.0, rules="strict"),
        pope=metrics("pope", 85.5, rules="llava", f1=80.1),
        mmb=metrics("kmmbench", 61.25),
        synth=metrics("synth_vqa", 33.333),
        vqa=metrics("vqav2", 75.5, model="other"),
        custom=metrics("my_set", 12.0))
    out = tmp_path / "report"
    assert cli(["eval", "report", "--scores", *paths, "--out", str(out), "--with-paper", "--title", "T"]) == 0
    printed = capsys.readouterr().out
    assert printed == (out / "report.md").read_text()
    lines = printed.splitlines()
    assert lines[0] == "# T"
    header = "| model | BVQA-ko | KoViz | KoLiv | BVQA-en | VQAv2 | GQA | LLaVA-Bench | POPE (acc) |"
    assert header in lines
    assert "| ours | 57.90 | 40.00 (strict) | - | - | - | - | - | 85.50 |" in lines  # POPE: accuracy, not F1
    assert "| other | - | - | - | - | 75.50 | - | - | - |" in lines
    assert "| paper: X-LLaVA 13B | 57.9 | 51.3 | 61.7 | 34.3 | 75.5 | 64.0 | 57.5 | 85.5 |" in lines
    assert "| paper: KoLLaVA 7B | 45.3 | 55.9 | 54.2 | 5.5 | - | - | - | - |" in lines
    assert "| model | K-MMBench | synth VQA | my_set |" in lines  # only the benchmarks scored, unknown ones last
    assert "| ours | 61.25 | 33.33 | 12.00 |" in lines
    report = json.loads((out / "report.json").read_text())
    ours = next(r for r in report["rows"] if r["model"] == "ours")
    assert ours["table3"]["koviz"]["rules"] == "strict" and ours["table3"]["koliv"] is None
    assert ours["table3"]["pope"]["value"] == 85.5 and ours["other"]["kmmbench"]["file"] == paths[3]
    assert [r["source"] for r in report["rows"]].count("ours") == 2 and len(report["rows"]) == 5


def test_report_without_other_benchmarks_or_out(tmp_path, capsys):
    paths = write_scores(tmp_path, a=metrics("gqa", 64.04, model=None))
    assert cli(["eval", "report", "--scores", *paths]) == 0
    printed = capsys.readouterr().out
    assert "| unknown model | - | - | - | - | - | 64.04 | - | - |" in printed and "Other benchmarks" not in printed
    assert not (tmp_path / "report.md").exists()


def test_report_rows_named_per_file_and_duplicates(tmp_path, capsys):
    paths = write_scores(tmp_path, p=metrics("koviz", 51.3, rules="paper"), s=metrics("koviz", 40.0, rules="strict"))
    assert cli(["eval", "report", "--scores", *paths]) == 2
    err = capsys.readouterr().err
    assert f"{paths[1]}: a second koviz score for model 'ours'" in err
    assert cli(["eval", "report", "--scores", *paths, "--model", "paper rules", "strict rules"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| paper rules | - | 51.30 | - | - | - | - | - | - |" in lines
    assert "| strict rules | - | 40.00 (strict) | - | - | - | - | - | - |" in lines
    assert cli(["eval", "report", "--scores", *paths, "--model", "a", "b", "c"]) == 2
    assert "--model takes one name or one per --scores file" in capsys.readouterr().err


def test_report_rejects_files_without_metrics(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"benchmark": "gqa"}))
    assert cli(["eval", "report", "--scores", str(bad)]) == 2
    assert f"{bad}: `accuracy` must be a number" in capsys.readouterr().err
    bad.write_text("{")
    assert cli(["eval", "report", "--scores", str(bad)]) == 2
    assert f"{bad}:1: invalid JSON" in capsys.readouterr().err


def test_score_then_report(tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "text": t, "label": "예", "model_id": "xllava-demo"},
                                          ensure_ascii=False) + "\n" for i, t in enumerate(["예", "네", "아니요"])))
    for rules in ("paper", "strict"):
        assert cli(["eval", "score", "--benchmark", "bokvqa_ko", "--answers", str(answers), "--rules", rules,
                    "--out", str(tmp_path / f"{rules}.json")]) == 0
    capsys.readouterr()
    assert cli(["eval", "report", "--scores", str(tmp_path / "strict.json")]) == 0
    assert "| xllava-demo | 66.67 (strict) | - |" in capsys.readouterr().out
    assert cli(["eval", "report", "--scores", str(tmp_path / "paper.json")]) == 0
    assert "| xllava-demo | 33.33 | - |" in capsys.readouterr().out
