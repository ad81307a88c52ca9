"""`xllava data check | show | build` from the command line."""

import json

import pytest
from data_fixtures import make_vif_corpus, train_tokenizer

from xllava_jax.cli import main as cli
from xllava_jax.data.pipeline import VifSpec, encode_record, load_records


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    tok = train_tokenizer(d)
    corpus, root = make_vif_corpus(d, 6)
    return d, tok, corpus, root


def test_check_reports_and_exit_codes(files, tmp_path, capsys):
    d, _, corpus, root = files
    assert cli(["data", "check", "--corpus", str(corpus), "--image-root", str(root)]) == 0
    assert "6 usable records, 0 problems" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(corpus.read_text() + "{oops\n")
    assert cli(["data", "check", "--corpus", str(bad), "--image-root", str(root), "--json"]) == 1
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["records"] == 6 and report["problems"] == [f"{bad}:line 7: invalid JSON (Expecting property name "
                                                             "enclosed in double quotes)"]


def test_show_json_matches_the_encoder(files, capsys):
    d, tok, corpus, _ = files
    assert cli(["data", "show", "--corpus", str(corpus), "--tokenizer", str(tok), "--template", "vicuna_v1",
                "--preset", "tiny", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    records, _ = load_records([corpus])
    spec = VifSpec(tokenizer=str(tok), num_image_tokens=16, image_token_id=255, template="vicuna_v1", max_len=10**6)
    assert [x["id"] for x in lines] == [r["id"] for r in records]
    for line, record in zip(lines, records):
        enc = encode_record(record, spec)
        assert line["input_ids"] == enc.input_ids and line["labels"] == enc.labels
    assert cli(["data", "show", "--corpus", str(corpus), "--tokenizer", str(tok), "--preset", "tiny",
                "--limit", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("== r0") and "[[" in text and "</s>]]" in text


def test_build_and_errors(files, tmp_path, capsys):
    d, tok, corpus, root = files
    assert cli(["data", "build", "--corpus", str(corpus), "--image-root", str(root), "--tokenizer", str(tok),
                "--preset", "tiny", "--out", str(tmp_path / "ar"), "--shards", "2"]) == 0
    assert "wrote 6 records" in capsys.readouterr().out
    assert cli(["data", "show", "--corpus", str(tmp_path / "none.json"), "--tokenizer", str(tok)]) == 2
    assert "cannot read corpus" in capsys.readouterr().err
    assert cli(["data", "show", "--corpus", str(corpus), "--tokenizer", str(corpus)]) == 2
    assert "not a SentencePiece model" in capsys.readouterr().err


def test_show_keeps_a_record_that_opens_with_gpt(files, tmp_path, capsys):
    d, tok, _, _ = files
    corpus = tmp_path / "gpt_first.jsonl"
    turns = [{"from": "gpt", "value": "Hello! Ask me anything."}, {"from": "human", "value": "<image>"},
             {"from": "gpt", "value": "A red car."}]
    corpus.write_text(json.dumps({"id": "g1", "image": "a.png", "conversations": turns}) + "\n")
    assert cli(["data", "show", "--corpus", str(corpus), "--tokenizer", str(tok), "--template", "vicuna_v1",
                "--mode", "llava", "--preset", "tiny"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("== g1") and "USER: <image x16> ASSISTANT:[[" in out and "Hello" not in out
    assert "skipped" not in err
