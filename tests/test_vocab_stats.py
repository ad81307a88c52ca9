"""`xllava vocab stats`: counts, script attribution, table and JSON output, bad input."""

import argparse
import json

import pytest
import sentencepiece as spm
from vocab_text import base_corpus, train_model

from xllava_jax.tokenizer.cli import add_vocab_parser, run_vocab
from xllava_jax.tokenizer.runtime import TokenizerError
from xllava_jax.tokenizer.stats import (
    compute_stats,
    count_tokens,
    format_table,
    token_scripts,
)
from xllava_jax.tokenizer.syllables import KSX1001_SYLLABLES


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    corpus = base_corpus()
    (root / "bytes.model").write_bytes(train_model(corpus, 1500))
    # No byte fallback and a character coverage that drops rare characters: those become <unk>.
    (root / "nobytes.model").write_bytes(train_model(corpus, 1500, byte_fallback=False, character_coverage=0.99))
    (root / "mixed.txt").write_text("Hello world 123\n\n안녕하세요 세계\n中文 한국어 English 🙂\n", encoding="utf-8")
    return root


def test_token_scripts_follow_the_character_a_token_covers():
    # "▁" before a byte-fallback word and the leading bytes of a character go with the next character.
    assert token_scripts(["a", " ", "", "", "한", "국", "!", " ", "中"]) == \
        ["latin", "hangul", "hangul", "hangul", "hangul", "hangul", "other", "han", "han"]
    assert token_scripts(["x", "  "]) == ["latin", "other"]


def test_counts_add_up(models):
    sp = spm.SentencePieceProcessor(model_file=str(models / "bytes.model"))
    lines = ["Hello world 123", "안녕하세요 세계", "中文 한국어 English 🙂"]
    counts = count_tokens(sp, lines)
    assert counts["chars"] == sum(map(len, lines)) and counts["words"] == 9
    assert counts["tokens"] == sum(len(ids) for ids in sp.encode(lines))
    assert sum(s["tokens"] for s in counts["scripts"].values()) == counts["tokens"]
    assert counts["scripts"]["hangul"]["chars"] == 10 and counts["scripts"]["han"]["chars"] == 2
    assert counts["byte_tokens"] == sum(sp.is_byte(i) for ids in sp.encode(lines) for i in ids) > 0
    assert counts["unk_tokens"] == 0


def test_compute_stats_and_table(models):
    stats = compute_stats([models / "bytes.model", models / "nobytes.model"], [models / "mixed.txt"])
    assert len(stats["results"]) == 2
    with_bytes, without = stats["results"]
    assert with_bytes["unk_tokens"] == 0 and with_bytes["byte_fallback_share"] > 0
    assert without["unk_tokens"] > 0 and without["byte_fallback_share"] == 0
    assert with_bytes["tokens_per_char"] == round(with_bytes["tokens"] / with_bytes["chars"], 4)
    assert with_bytes["tokens_per_word"] == round(with_bytes["tokens"] / with_bytes["words"], 4)
    table = format_table(stats)
    assert "mixed.txt" in table and "hangul t/c" in table and str(models / "nobytes.model") in table
    # How many of the 2,350 KS X 1001 syllables each tokenizer has as whole pieces.
    sp = spm.SentencePieceProcessor(model_file=str(models / "bytes.model"))
    whole = sum(sp.piece_to_id(s) != sp.unk_id() for s in KSX1001_SYLLABLES)
    assert 0 < whole < 2350 and with_bytes["ksx1001_syllables"] == whole
    assert "KS X 1001" in table and f"{whole}/2350" in table.splitlines()[3]


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="xllava")
    add_vocab_parser(parser.add_subparsers(dest="command", required=True))
    run_vocab(parser.parse_args(["vocab", *argv]))


def test_cli_json_and_table(models, capsys):
    run_cli(["stats", "--tokenizer", str(models / "bytes.model"), "--text", str(models / "mixed.txt"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["results"][0]["scripts"]["hangul"]["tokens_per_char"] > 0
    (models / "hf_dir").mkdir(exist_ok=True)
    (models / "hf_dir" / "tokenizer.model").write_bytes((models / "bytes.model").read_bytes())
    run_cli(["stats", "--tokenizer", str(models / "bytes.model"), str(models / "hf_dir"), "--text",
             str(models / "mixed.txt")])
    table = capsys.readouterr().out
    assert "tok/char" in table and "+0.0%" in table.splitlines()[-1]  # a directory holding tokenizer.model


@pytest.mark.parametrize("argv, message", [
    (["--tokenizer", "{root}/missing.model", "--text", "{root}/mixed.txt"], "no such file"),
    (["--tokenizer", "{root}/mixed.txt", "--text", "{root}/mixed.txt"], "not a SentencePiece model"),
    (["--tokenizer", "{root}/bytes.model", "--text", "{root}/missing.txt"], "missing.txt: no such file"),
    (["--tokenizer", "{root}/bytes.model", "--text", "{root}"], "a directory"),
    (["--tokenizer", "{root}", "--text", "{root}/mixed.txt"], "holds no tokenizer.model"),
])
def test_bad_input(models, argv, message):
    with pytest.raises(TokenizerError, match=message):
        run_cli(["stats", *[a.format(root=models) for a in argv]])
