"""Append-only JSONL journals: only a torn last line is dropped (and cut from the file); other damage is an error."""

import json

import pytest

from xllava_jax.jsonl import JournalError, read_journal
from xllava_jax.train.metrics import MetricsWriter, read_metrics


def rows(*steps: int) -> str:
    return "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)


def test_torn_last_line_is_dropped_and_cut(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text(rows(1, 2) + '{"step": 3, "lo')
    records, warning = read_journal(path)
    assert [r["step"] for r in records] == [1, 2]
    assert "j.jsonl:3: dropped an unterminated last line (15 bytes" in warning
    assert path.read_text() == rows(1, 2)
    assert read_journal(path) == (records, None)
    assert read_journal(tmp_path / "missing.jsonl") == ([], None)


def test_reading_without_repair_leaves_the_file(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text(rows(1) + '{"st')
    assert read_journal(path, repair=False)[0] == [{"step": 1, "loss": 1.0}]
    assert path.read_text().endswith('{"st')


@pytest.mark.parametrize("text, where", [
    (rows(1) + "{oops\n" + rows(3), "j.jsonl:2: not a JSON line"),
    (rows(1) + "\n" + rows(3), "j.jsonl:2: not a JSON line"),
    (rows(1) + "{oops\n", "j.jsonl:2: not a JSON line"),  # terminated, so not a torn write
    (rows(1) + "[1, 2]\n", "j.jsonl:2: not a JSON object"),
])
def test_other_damage_names_file_and_line(tmp_path, text, where):
    path = tmp_path / "j.jsonl"
    path.write_text(text)
    with pytest.raises(JournalError, match=where):
        read_journal(path)
    assert path.read_text() == text


def test_check_names_file_and_line(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text(rows(1) + '{"loss": 2}\n')
    with pytest.raises(JournalError, match=r"j.jsonl:2: no step; fix or remove it"):
        read_journal(path, check=lambda row: None if "step" in row else "no step")


def test_metrics_resume_after_a_torn_last_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(rows(1, 2, 3) + '{"step": 4, "loss": 0.2')
    writer = MetricsWriter(tmp_path, resume_step=2)
    assert path.read_text() == rows(1, 2)  # the torn line and the steps after the checkpoint are gone
    assert "metrics.jsonl:4: dropped an unterminated last line" in caplog.text
    writer.write(3, {"loss": 1.0 / 3})
    writer.write(4, {"loss": float("nan")})
    writer.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5},
                                      {"step": 3, "loss": 1.0 / 3}, {"step": 4, "loss": None}]


def test_metrics_resume_refuses_a_damaged_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(rows(1) + '{"step": 2, "lo\n' + rows(3))
    with pytest.raises(JournalError, match=r"metrics.jsonl:2: not a JSON line"):
        MetricsWriter(tmp_path, resume_step=3)
    path.write_text(rows(1) + '{"loss": 2}\n')
    with pytest.raises(JournalError, match=r"metrics.jsonl:2: a metrics row without an integer step"):
        MetricsWriter(tmp_path, resume_step=3)


def test_read_metrics_ignores_a_line_being_written(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(rows(1) + '{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]
    assert (tmp_path / "metrics.jsonl").read_text().endswith('"lo')  # a reader never cuts the file
