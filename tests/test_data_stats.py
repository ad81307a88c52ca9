"""`xllava data stats`: the length distribution, padded and packed pad fractions, rows per 1,000 records."""

from __future__ import annotations

import json

import pytest
from data_fixtures import make_vif_corpus, train_tokenizer

from xllava_jax.cli import main
from xllava_jax.config import ModelConfig
from xllava_jax.data.packing import plan_rows
from xllava_jax.data.pipeline import VifSpec, encode_record, load_records


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("stats")
    tok = train_tokenizer(d)
    corpus, _ = make_vif_corpus(d, 30)
    return tok, corpus


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["data", "stats", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_stats_match_the_records_lengths_and_the_packer(files, capsys):
    tok, corpus = files
    args = ["--corpus", str(corpus), "--tokenizer", str(tok), "--preset", "tiny", "--system", "Be brief."]
    code, out, _ = run(capsys, *args, "--pack", "--max-len", "256", "--images-per-row", "2", "--window", "8",
                       "--json")
    assert code == 0
    stats = json.loads(out)
    cfg = ModelConfig.tiny()
    spec = VifSpec(tokenizer=str(tok), num_image_tokens=cfg.num_image_tokens, image_token_id=cfg.image_token_id,
                   system="Be brief.", max_len=256)
    records, _ = load_records([corpus])
    lengths = [len(encode_record(r, spec).input_ids) for r in records]
    assert stats["records"] == 30 and stats["with_image"] == 20 and stats["problems"] == 0
    assert stats["tokens"]["min"] == min(lengths) and stats["tokens"]["max"] == max(lengths)
    assert stats["tokens"]["mean"] == round(sum(lengths) / 30, 1)
    assert sum(stats["histogram"].values()) == pytest.approx(1.0)
    assert stats["pad_fraction_padded"] == round(1 - sum(lengths) / (30 * 256), 4)
    # Packed: windows of 8 in the pipeline's shuffled order; at most 2 images a row, at least 2 records.
    assert stats["images_per_row"] == 2 and stats["most_images_in_a_row"] == 2
    rows = stats["rows_per_1000_packed"] * 30 / 1000
    assert rows == round(rows) and rows <= 30 / 2 + 4
    assert stats["pad_fraction_packed"] == round(1 - sum(lengths) / (rows * 256), 4)
    assert rows >= len(plan_rows(lengths, [r["image"] is not None for r in records], 256, 2))  # windows cost rows


def test_stats_report_what_max_len_cuts_or_leaves_out(files, capsys):
    tok, corpus = files
    args = ["--corpus", str(corpus), "--tokenizer", str(tok), "--preset", "tiny", "--system", ""]
    code, out, err = run(capsys, *args, "--max-len", "72")
    assert code == 0 and not err
    assert "pad fraction" in out and "packed" not in out
    cut = json.loads(run(capsys, *args, "--max-len", "72", "--json")[1])
    assert cut["truncated"] > 0 and cut["skipped_over_max_len"] == 0
    assert cut["truncated"] == round(cut["histogram"][">72"] * 30) and f"{cut['truncated']} truncated" in out
    _, dropped, err = run(capsys, *args, "--max-len", "72", "--overflow", "drop", "--json")
    stats = json.loads(dropped)
    assert stats["skipped_over_max_len"] == cut["truncated"] and stats["truncated"] == 0
    assert err.count("skipped ") == stats["skipped_over_max_len"] and "corpus.jsonl:line" in err
    assert stats["pad_fraction_padded"] > cut["pad_fraction_padded"]  # left out: the records that filled rows


def test_stats_bad_input_is_one_line(files, capsys):
    tok, corpus = files
    code, out, err = run(capsys, "--corpus", str(corpus), "--tokenizer", str(tok), "--preset", "tiny",
                         "--max-len", "10")
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and "max_len 10" in err
