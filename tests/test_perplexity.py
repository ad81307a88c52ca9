"""`xllava eval perplexity` against a direct computation of the loss on the same tokens."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flax import nnx
from infer_fixtures import make_checkpoint

from xllava_jax.cli import main
from xllava_jax.errors import UserError
from xllava_jax.eval.perplexity import Scorer, score_file, windows
from xllava_jax.infer.engine import Engine

SEQ = 8
TEXT_EN = "the red circle is left of the blue square\n\nhow many shapes are there\na triangle\n"
TEXT_KO = "빨간색 원은 왼쪽에 있습니다\n파란색 사각형 ✓ 위\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    ckpt = make_checkpoint(root / "ckpt")
    (root / "en.txt").write_text(TEXT_EN)
    (root / "ko.txt").write_text(TEXT_KO)
    return ckpt, root, Engine.load(ckpt)


def direct_nll(engine: Engine, text: str) -> tuple[float, int]:
    """Summed NLL of every document's tokens, each chunk of SEQ - 1 tokens after a bos, unpadded, in float64."""
    tok = engine.tokenizer
    model = nnx.merge(engine.generator.graphdef, engine.generator.state)
    total, count = 0.0, 0
    for doc in filter(str.strip, text.splitlines()):
        ids = tok.encode(doc)
        for start in range(0, len(ids), SEQ - 1):
            row = [tok.bos_id, *ids[start:start + SEQ - 1]]
            logits = np.asarray(model(np.array([row], np.int32)), np.float64)[0]
            top = logits.max(-1, keepdims=True)
            logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
            total -= sum(logp[t, row[t + 1]] for t in range(len(row) - 1))
            count += len(row) - 1
    return total, count


def test_windows_cover_every_token_once():
    assert windows([[5, 6, 7, 8, 9], [3]], 1, 3) == [[1, 5, 6], [1, 7, 8], [1, 9], [1, 3]]
    with pytest.raises(UserError, match="`seq_len` must be at least 2"):  # the library names its parameter
        windows([[5]], 1, 1)


def test_figures_match_a_direct_computation(setup):
    ckpt, root, engine = setup
    scorer = Scorer(engine, seq_len=SEQ, batch_size=3)
    for name, text in (("en.txt", TEXT_EN), ("ko.txt", TEXT_KO)):
        got = score_file(scorer, root / name)
        nll, count = direct_nll(engine, text)
        chars = sum(len(line) for line in text.splitlines() if line.strip())
        assert got["tokens"] == count and got["characters"] == chars
        assert got["documents"] == len([line for line in text.splitlines() if line.strip()])
        assert got["nll_per_token"] == pytest.approx(nll / count, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
        assert got["bits_per_character"] == pytest.approx(nll / math.log(2) / chars, rel=1e-5)
    assert scorer._nll._cache_size() == 1  # one program for both files and their short last batches


def test_command_line(setup, tmp_path, capsys):
    ckpt, root, _ = setup
    out = tmp_path / "ppl.json"
    code = main(["eval", "perplexity", "--ckpt", str(ckpt), "--text", str(root / "en.txt"), str(root / "ko.txt"),
                 "--seq-len", str(SEQ), "--batch-size", "4", "--out", str(out)])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["benchmark"] == "perplexity" and result == json.loads(out.read_text())
    assert set(result["files"]) == {str(root / "en.txt"), str(root / "ko.txt")}
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe bad")
    assert main(["eval", "perplexity", "--ckpt", str(ckpt), "--text", str(tmp_path / "bad.txt")]) == 2
    assert "bad.txt: not UTF-8" in capsys.readouterr().err
    assert main(["eval", "perplexity", "--ckpt", str(ckpt), "--text", str(root / "en.txt"), "--seq-len", "1"]) == 2
    assert "--seq-len must be at least 2" in capsys.readouterr().err  # the command names its flag
