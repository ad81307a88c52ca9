"""`xllava vocab expand` / `resize`: the guarantees of issue #3, on tokenizers trained here on generated text."""

import itertools
import json
import random

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb
from vocab_text import (
    base_corpus,
    chinese_sentences,
    english_sentences,
    indented_lines,
    korean_lexicon,
    korean_sentences,
    llama_base,
    train_model,
)

from xllava_jax.cli import main as xllava_main
from xllava_jax.tokenizer.expand import expand_tokenizer, read_expansion
from xllava_jax.tokenizer.stats import compute_stats, count_tokens
from xllava_jax.tokenizer.syllables import KSX1001_SYLLABLES

BASE_SIZE = 2000
NUM_NEW = 7000
ENGLISH_PROSE = """\
The quick brown fox jumps over the lazy dog; meanwhile, 42 developers shipped v2.3.1 at 09:30 UTC.
"Well," she said, "it's not what I'd call a success -- but it isn't a failure either."
Email alice@example.com or visit https://example.org/path?query=1&x=2 for details.
def tokenize(text: str) -> list[int]:  # returns ids, e.g. [1, 15043, 3186]
Prices rose 3.5% in Q4 (from $1,299.99 to $1,345.00), according to the report's appendix B.
Mr. O'Neill's well-known co-operative re-entered the market in mid-2019, didn't it?
    Indented line with trailing spaces   
ALL CAPS HEADLINE: NASA, ESA & JAXA AGREE ON 2030 PLAN!!!
"""
LAW_TEXT = "제250조 사람을 살해한 자는 사형, 무기 또는 5년 이상의 징역에 처한다. 죄를 지은 소녀는 벌금형을 받았다."


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `xllava vocab ...` through the real entry point: errors are one stderr line and exit 2."""
    code = xllava_main(["vocab", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    lexicon = korean_lexicon()
    (root / "base.model").write_bytes(llama_base(BASE_SIZE))
    (root / "ko_train.txt").write_text("\n".join(korean_sentences(40000, 11, lexicon)) + "\n", encoding="utf-8")
    (root / "ko_small.txt").write_text("\n".join(korean_sentences(60, 12, lexicon)) + "\n", encoding="utf-8")
    ko_lines = korean_sentences(3000, 13, lexicon)
    (root / "ko_bpe.model").write_bytes(train_model(ko_lines, 1500, byte_fallback=False, hard_vocab_limit=False))
    (root / "ko_unigram.model").write_bytes(train_model(ko_lines, 1500, model_type="unigram", byte_fallback=False,
                                                                hard_vocab_limit=False))
    # Bad input for the error tests.
    (root / "not_a_model.model").write_text("this is not a sentencepiece model\n")
    (root / "latin1.txt").write_bytes("caf\xe9 \xe0 la cr\xe8me\n".encode("latin-1"))
    (root / "unigram_base.model").write_bytes(train_model(base_corpus()[:3000], 800, model_type="unigram"))
    (root / "llava_tok").mkdir()
    (root / "llava_tok" / "tokenizer.model").write_bytes((root / "base.model").read_bytes())
    (root / "llava_tok" / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {str(BASE_SIZE): {"content": "<image>", "special": True}}}))
    (root / "full").mkdir()
    (root / "full" / "x").write_text("x")
    return {"root": root, "base": root / "base.model", "held_out": korean_sentences(400, 99, lexicon)}


@pytest.fixture(scope="module")
def expanded(data):
    out = data["root"] / "expanded"
    record = expand_tokenizer(data["base"], out, train_corpus=[data["root"] / "ko_train.txt"], num_new=NUM_NEW)
    return {"dir": out, "record": record, "base": spm.SentencePieceProcessor(model_file=str(data["base"])),
            "sp": spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))}


def mixed_texts() -> list[str]:
    rng = random.Random(7)
    lines = korean_sentences(60, 21) + english_sentences(60, 22) + chinese_sentences(20, 23)
    mixed = [" ".join(rng.sample(lines, 3)) + rng.choice(("", "\n", "  ", "\n\n  끝")) for _ in range(60)]
    return lines + mixed + [
        "안녕하세요, 세계! Hello, world! 你好，世界！", "숫자 0123456789 와 12,345.67원", "emoji 🙂👍🏽🇰🇷 이모지 😀",
        "tabs\tand   runs     of spaces\n\n\nnew lines", "한국어\n\n영어 English\r\n중국어 中文", "x  ", "끝 ",
        "ㄱㄴㄷ ㅏㅑ jamo and 한글 syllables", "ﾟ half-width ｶﾀｶﾅ and ＦＵＬＬ width"]


# ----------------------------------------------------------------------------------- guarantees
def test_english_text_gives_base_ids(expanded):
    english = english_sentences(300, 123) + ENGLISH_PROSE.splitlines()
    base, sp = expanded["base"], expanded["sp"]
    assert sp.encode(english) == base.encode(english)


def test_decode_encode_round_trip(expanded):
    for text in mixed_texts() + [" leading space", "   ", "\n", "trailing\n"]:
        assert expanded["sp"].decode(expanded["sp"].encode(text)) == text


def test_hf_tokenizers_match_sentencepiece(expanded):
    transformers = pytest.importorskip("transformers")
    sp, out = expanded["sp"], str(expanded["dir"])
    texts = mixed_texts() + [line.strip() + "    x  y" for line in indented_lines(40, 31)]
    for cls in (transformers.AutoTokenizer, transformers.LlamaTokenizerFast):
        tok = cls.from_pretrained(out)
        assert len(tok) == BASE_SIZE + NUM_NEW
        for text in texts:
            ids = tok(text)["input_ids"]
            assert ids == [sp.bos_id()] + sp.encode(text), text
            assert tok.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_json_matches_sentencepiece_exactly(expanded):
    # The `tokenizers` pipeline of tokenizer.json (what transformers 4 loads) also matches on text that
    # starts with whitespace, where transformers 5's LlamaTokenizer adds no dummy prefix.
    tokenizers = pytest.importorskip("tokenizers")
    sp = expanded["sp"]
    tok = tokenizers.Tokenizer.from_file(str(expanded["dir"] / "tokenizer.json"))
    for text in mixed_texts() + indented_lines(40, 31) + [" leading space", "   "]:
        assert tok.encode(text).ids == [sp.bos_id()] + sp.encode(text), text
        assert tok.decode(tok.encode(text).ids) == text


def test_korean_tokens_per_hangul_char_fall_by_60_percent(data, expanded):
    before = count_tokens(expanded["base"], data["held_out"])["scripts"]["hangul"]
    after = count_tokens(expanded["sp"], data["held_out"])["scripts"]["hangul"]
    assert before["chars"] == after["chars"] > 5000
    reduction = 1 - after["tokens"] / before["tokens"]
    assert expanded["record"]["num_new"] == NUM_NEW
    assert reduction >= 0.60, f"{before['tokens'] / before['chars']:.3f} -> {after['tokens'] / after['chars']:.3f}"


def test_expansion_keeps_base_and_records_new_pieces(data, expanded):
    base, merged = pb.ModelProto(), pb.ModelProto()
    base.ParseFromString(data["base"].read_bytes())
    merged.ParseFromString((expanded["dir"] / "tokenizer.model").read_bytes())
    assert len(merged.pieces) == BASE_SIZE + NUM_NEW
    assert list(merged.pieces)[:BASE_SIZE] == list(base.pieces)
    assert merged.normalizer_spec == base.normalizer_spec and merged.trainer_spec.byte_fallback
    scores = [p.score for p in merged.pieces[BASE_SIZE:]]
    assert max(scores) < min(p.score for p in base.pieces) == -1e9
    assert all(a > b for a, b in itertools.pairwise(scores))  # distinct in float32

    record = read_expansion(expanded["dir"])
    assert (record["base_size"], record["new_size"]) == (BASE_SIZE, BASE_SIZE + NUM_NEW)
    assert record["filtered"]["control"] == 3 and record["filtered"]["in_base"] > 0
    assert record["unreachable"] == 0 and record["warnings"] == []
    plain = pb.ModelProto()
    plain.CopyFrom(base)
    plain.normalizer_spec.add_dummy_prefix = False
    plain_sp = spm.SentencePieceProcessor(model_proto=plain.SerializeToString())
    for token in record["new_tokens"]:
        assert merged.pieces[token["id"]].piece == token["piece"]
        assert all(0 <= i < BASE_SIZE for i in token["subword_ids"])
        assert plain_sp.decode(token["subword_ids"]) == token["piece"].replace("\u2581", " ")
        if not token["piece"].startswith("\u2581"):  # a word-internal piece gets no word-start mark
            assert not plain_sp.id_to_piece(token["subword_ids"][0]).startswith("\u2581")


def test_ksx1001_set():
    assert len(KSX1001_SYLLABLES) == len(set(KSX1001_SYLLABLES)) == 2350
    assert KSX1001_SYLLABLES[:3] == ("가", "각", "간") and KSX1001_SYLLABLES[-1] == "힝"
    assert list(KSX1001_SYLLABLES) == sorted(KSX1001_SYLLABLES)
    assert all(s in KSX1001_SYLLABLES for s in "녀훈죄벌") and not any(s in KSX1001_SYLLABLES for s in "똠햏")


def test_every_ksx1001_syllable_is_a_piece_after_expansion(data, expanded):
    base, sp = expanded["base"], expanded["sp"]
    lacking = [s for s in KSX1001_SYLLABLES if base.piece_to_id(s) == base.unk_id()]
    assert 2000 < len(lacking) < 2350
    assert all(sp.id_to_piece(sp.piece_to_id(s)) == s for s in KSX1001_SYLLABLES)
    record = expanded["record"]
    assert [t["piece"] for t in record["new_tokens"][:len(lacking)]] == lacking  # first, in 가나다 order
    assert record["num_new"] == NUM_NEW  # within --num-new
    assert record["ksx1001_syllables"] == {"total": 2350, "in_base": 2350 - len(lacking), "added": len(lacking),
                                           "after": 2350, "ensured": True}
    # Syllables the training text lacks no longer fall back to bytes.
    trained_on = set((data["root"] / "ko_train.txt").read_text(encoding="utf-8"))
    assert {"죄", "벌", "녀"} <= set(LAW_TEXT) - trained_on
    assert not any(sp.is_byte(i) for i in sp.encode(LAW_TEXT))
    stats = compute_stats([data["base"], expanded["dir"]], [data["root"] / "ko_small.txt"])
    assert [r["ksx1001_syllables"] for r in stats["results"]] == [2350 - len(lacking), 2350]


# ----------------------------------------------------------------------------------- other sources
def test_merge_bpe_model(data, tmp_path):
    record = expand_tokenizer(data["base"], tmp_path / "out", merge_model=data["root"] / "ko_bpe.model")
    assert record["source"]["model_type"] == "bpe" and record["unreachable"] == 0
    assert record["filtered"]["control"] == 3 and record["filtered"]["no_script"] > 0
    assert record["ksx1001_syllables"]["after"] == 2350
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    assert sp.encode(ENGLISH_PROSE) == spm.SentencePieceProcessor(model_file=str(data["base"])).encode(ENGLISH_PROSE)


def test_merge_unigram_model_reports_unreachable_pieces(data, tmp_path):
    record = expand_tokenizer(data["base"], tmp_path / "out", merge_model=data["root"] / "ko_unigram.model")
    assert record["source"]["model_type"] == "unigram"
    assert record["unreachable"] > 0 and "unigram" in record["warnings"][0]


def test_merge_vocab_filters_and_counts(data, tmp_path):
    base = spm.SentencePieceProcessor(model_file=str(data["base"]))
    pieces = map(base.id_to_piece, range(BASE_SIZE - 1, 0, -1))
    in_base = next(p for p in pieces if p[:1] == "\u2581" and p[1:].isalpha())
    lines = [in_base, "<0x41>", "", "\u2581", "   ", "hello", "▁사과나무\t-12.5", " 사과나무", "배나무",
             "<s>", "▁수박", "배나무"]
    (tmp_path / "pieces.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    record = expand_tokenizer(data["base"], tmp_path / "out", merge_vocab=tmp_path / "pieces.txt",
                              syllable_coverage=False)
    assert record["filtered"] == {"in_base": 2, "duplicate": 2, "byte": 1, "control": 0, "empty": 3,
                                  "no_script": 1, "beyond_num_new": 0}
    new = [t["piece"] for t in record["new_tokens"]]
    # The list's pieces come first, in order; the characters they need that the base lacks follow them.
    assert new[:3] == ["▁사과나무", "배나무", "▁수박"] and all(len(p) == 1 for p in new[3:])
    assert all(c in set(new) | {base.id_to_piece(i) for i in range(BASE_SIZE)} for p in new for c in p)
    assert record["ksx1001_syllables"]["added"] == 0 and not record["ksx1001_syllables"]["ensured"]
    capped = expand_tokenizer(data["base"], tmp_path / "capped", merge_vocab=tmp_path / "pieces.txt",
                              num_new=len(new) - 1, syllable_coverage=False)
    assert capped["num_new"] <= len(new) - 1 and capped["filtered"]["beyond_num_new"] > 0
    anyscript = expand_tokenizer(data["base"], tmp_path / "any", merge_vocab=tmp_path / "pieces.txt", script="any",
                                 syllable_coverage=False)
    assert "hello" in [t["piece"] for t in anyscript["new_tokens"]]
    # By default the syllables the base lacks follow the list's pieces (its characters among them).
    covered = expand_tokenizer(data["base"], tmp_path / "covered", merge_vocab=tmp_path / "pieces.txt")
    added = covered["ksx1001_syllables"]["added"]
    assert [t["piece"] for t in covered["new_tokens"][:3]] == ["▁사과나무", "배나무", "▁수박"]
    assert [t["piece"] for t in covered["new_tokens"][3:]] == [s for s in KSX1001_SYLLABLES
                                                                if base.piece_to_id(s) == base.unk_id()]
    assert covered["filtered"] == record["filtered"] and covered["num_new"] == added + 3


def test_merged_pieces_keep_the_ids_of_a_plain_append(data, tmp_path):
    # X-LLaVA's recipe: LLaMA-2's 32,000 ids unchanged and KoBERT's pieces right after them, in their order
    # (32,000 + 7,478 = 39,478); the syllables the base lacks, then other characters the pieces need, follow.
    base = pb.ModelProto()
    base.ParseFromString(data["base"].read_bytes())
    in_base = {p.piece for p in base.pieces}
    lacking = [s for s in KSX1001_SYLLABLES if s not in in_base]
    pieces = ["▁사과", "나무", "▁사과나무", "배", "▁똠방"]  # 배: a lacking syllable; 똠: not in KS X 1001
    assert "배" in lacking and "똠" not in in_base | set(KSX1001_SYLLABLES)
    (tmp_path / "pieces.txt").write_text("\n".join(pieces) + "\n", encoding="utf-8")
    record = expand_tokenizer(data["base"], tmp_path / "list", merge_vocab=tmp_path / "pieces.txt")
    assert [t["piece"] for t in record["new_tokens"]] == [*pieces, *(s for s in lacking if s != "배"), "똠"]
    assert record["ksx1001_syllables"] == {"total": 2350, "in_base": 2350 - len(lacking), "added": len(lacking),
                                           "after": 2350, "ensured": True}
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "list" / "tokenizer.model"))
    assert [sp.piece_to_id(p) for p in pieces] == list(range(BASE_SIZE, BASE_SIZE + len(pieces)))
    assert [sp.id_to_piece(i) for i in range(BASE_SIZE)] == [p.piece for p in base.pieces]
    ids = sp.encode("사과나무 배 똠방")
    assert sp.decode(ids) == "사과나무 배 똠방" and not any(sp.is_byte(i) for i in ids)
    # The same from a SentencePiece model: its kept pieces in its order, then the syllables it lacks.
    source = pb.ModelProto()
    source.ParseFromString((data["root"] / "ko_bpe.model").read_bytes())
    record = expand_tokenizer(data["base"], tmp_path / "model", merge_model=data["root"] / "ko_bpe.model")
    new = [t["piece"] for t in record["new_tokens"]]
    kept = [p.piece for p in sorted(source.pieces, key=lambda p: -p.score) if p.piece in set(new)]
    assert len(kept) > 500 and new[:len(kept)] == kept
    assert new[len(kept):] == [s for s in lacking if s not in set(kept)]
    assert record["ksx1001_syllables"]["after"] == 2350


def test_syllable_coverage_in_the_cli(data, tmp_path, capsys):
    (tmp_path / "pieces.txt").write_text("▁사과\n", encoding="utf-8")
    argv = ["expand", "--base", str(data["base"]), "--merge-vocab", str(tmp_path / "pieces.txt")]
    code, out, err = run_cli([*argv, "--out", str(tmp_path / "a")], capsys)
    lacking = read_expansion(tmp_path / "a")["ksx1001_syllables"]["added"]
    assert code == 0 and f"+ {lacking:,} added = 2,350 of the 2,350 KS X 1001 Hangul syllables" in out, err
    code, out, err = run_cli([*argv, "--out", str(tmp_path / "b"), "--no-syllable-coverage"], capsys)
    assert code == 0 and read_expansion(tmp_path / "b")["ksx1001_syllables"]["added"] == 0
    assert "of the 2,350 KS X 1001 Hangul syllables (--no-syllable-coverage)" in out
    code, out, err = run_cli([*argv, "--out", str(tmp_path / "c"), "--num-new", str(lacking - 1)], capsys)
    assert code == 2 and err.count("xllava:") == 1 and not (tmp_path / "c").exists()
    assert (f"--num-new {lacking - 1}: the base lacks {lacking:,} of the 2,350 KS X 1001 Hangul syllables"
            in err and "--no-syllable-coverage" in err)
    code, out, err = run_cli([*argv, "--out", str(tmp_path / "d"), "--num-new", str(lacking)], capsys)
    assert code == 0 and read_expansion(tmp_path / "d")["num_new"] == lacking


def test_base_directory_settings_carry_over(data, tmp_path):
    transformers = pytest.importorskip("transformers")
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / "tokenizer.model").write_bytes(data["base"].read_bytes())
    (base_dir / "tokenizer_config.json").write_text(json.dumps(
        {"add_eos_token": True, "model_max_length": 4096, "pad_token": "<unk>", "chat_template": "{{ x }}"}))
    (tmp_path / "pieces.txt").write_text("▁사과\n", encoding="utf-8")
    expand_tokenizer(base_dir, tmp_path / "out", merge_vocab=tmp_path / "pieces.txt")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    assert tok("사과 apple")["input_ids"] == [sp.bos_id(), *sp.encode("사과 apple"), sp.eos_id()]
    assert tok.model_max_length == 4096 and tok.pad_token == "<unk>" and tok.chat_template == "{{ x }}"


# ----------------------------------------------------------------------------------- checkpoints
def test_resize_checkpoint_with_subword_mean(data, tmp_path, capsys):
    from xllava_jax.checkpoint import load_checkpoint, save_checkpoint
    from xllava_jax.config import LLAVA_IMAGE_TOKEN_INDEX, ModelConfig
    from xllava_jax.models.xllava import build_model

    tiny = ModelConfig.tiny()
    cfg = tiny.replace(text=tiny.text.__class__(**{**tiny.text.to_dict(), "vocab_size": BASE_SIZE}),
                       image_token_id=LLAVA_IMAGE_TOKEN_INDEX)
    save_checkpoint(tmp_path / "ckpt", build_model(cfg, seed=3))
    (tmp_path / "pieces.txt").write_text("▁사과\n▁수박을\n배나무\n", encoding="utf-8")
    code, _, err = run_cli(["expand", "--base", str(data["base"]), "--out", str(tmp_path / "tok"),
                              "--merge-vocab", str(tmp_path / "pieces.txt"), "--checkpoint", str(tmp_path / "ckpt"),
                              "--checkpoint-out", str(tmp_path / "grown")], capsys)
    assert code == 0, err
    old, _ = load_checkpoint(tmp_path / "ckpt")
    grown, _ = load_checkpoint(tmp_path / "grown")
    record = read_expansion(tmp_path / "grown")
    assert grown.cfg.text.vocab_size == record["new_size"]
    old_embed = np.asarray(old.language_model.embed_tokens.embedding[...])
    new_embed = np.asarray(grown.language_model.embed_tokens.embedding[...])
    new_head = np.asarray(grown.language_model.lm_head.kernel[...])
    np.testing.assert_array_equal(new_embed[:BASE_SIZE], old_embed)
    for token in record["new_tokens"]:
        rows = old_embed[token["subword_ids"]]
        np.testing.assert_allclose(new_embed[token["id"]], rows.mean(0), rtol=1e-5, atol=1e-6)
        head = np.asarray(old.language_model.lm_head.kernel[...])[:, token["subword_ids"]]
        np.testing.assert_allclose(new_head[:, token["id"]], head.mean(1), rtol=1e-5, atol=1e-6)
    assert (tmp_path / "grown" / "tokenizer.model").read_bytes() == (tmp_path / "tok" / "tokenizer.model").read_bytes()

    # The same through `vocab resize`; a checkpoint whose vocabulary is not the base size is refused.
    code, _, err = run_cli(["resize", "--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", str(tmp_path / "tok"),
                            "--out", str(tmp_path / "grown2"), "--init", "mean"], capsys)
    assert code == 0, err
    save_checkpoint(tmp_path / "ckpt256", build_model(tiny, seed=3))
    code, _, err = run_cli(["resize", "--checkpoint", str(tmp_path / "ckpt256"), "--tokenizer",
                            str(tmp_path / "tok"), "--out", str(tmp_path / "grown3")], capsys)
    assert code == 2 and err.count("xllava:") == 1 and "vocabulary of 256 rows" in err.strip().splitlines()[-1]
    # `expand --checkpoint` checks the checkpoint before it writes anything.
    code, _, err = run_cli(["expand", "--base", str(data["base"]), "--out", str(tmp_path / "tok2"), "--merge-vocab",
                            str(tmp_path / "pieces.txt"), "--checkpoint", str(tmp_path / "ckpt256"),
                            "--checkpoint-out", str(tmp_path / "grown4")], capsys)
    assert code == 2 and "vocabulary of 256 rows" in err and not (tmp_path / "tok2").exists()


# ----------------------------------------------------------------------------------- bad input
def bad_inputs(root, base):
    train = ["--train-corpus", str(root / "ko_small.txt")]
    return {
        "not_sentencepiece": (["--base", str(root / "not_a_model.model"), *train, "--num-new", "10"],
                              "not a SentencePiece model"),
        "unigram_base": (["--base", str(root / "unigram_base.model"), *train, "--num-new", "10"],
                         "unigram SentencePiece model, but the new pieces come from a BPE model"),
        "num_new_too_large": (["--base", str(base), *train, "--num-new", "50000"], "supports only"),
        "added_tokens_beyond": (["--base", str(root / "llava_tok"), *train, "--num-new", "10"],
                                f"adds tokens past the SentencePiece vocabulary (<image>={BASE_SIZE})"),
        "missing_base": (["--base", str(root / "missing.model"), *train, "--num-new", "10"], "no such file"),
        "missing_corpus": (["--base", str(base), "--train-corpus", str(root / "missing.txt"), "--num-new", "3000"],
                           "missing.txt: no such file"),
        "missing_merge_model": (["--base", str(base), "--merge-model", str(root / "missing.model")], "no such file"),
        "missing_vocab": (["--base", str(base), "--merge-vocab", str(root / "missing.txt")], "no such file"),
        "not_utf8": (["--base", str(base), "--train-corpus", str(root / "latin1.txt"), "--num-new", "3000"],
                     "not UTF-8"),
        "num_new_below_syllables": (["--base", str(base), *train, "--num-new", "10"],
                                    "--num-new 10: the base lacks 2,329 of the 2,350 KS X 1001 Hangul syllables"),
        "no_num_new": (["--base", str(base), *train], "needs --num-new"),
        "out_not_empty": (["--base", str(base), *train, "--num-new", "10"], "not empty"),
        "checkpoint_alone": (["--base", str(base), *train, "--num-new", "10", "--checkpoint", str(root)],
                             "--checkpoint and --checkpoint-out go together"),
    }


@pytest.mark.parametrize("case", ["not_sentencepiece", "unigram_base", "num_new_too_large", "added_tokens_beyond",
                                  "missing_base",
                                  "missing_corpus", "missing_merge_model", "missing_vocab", "not_utf8",
                                  "num_new_below_syllables", "no_num_new",
                                  "out_not_empty", "checkpoint_alone"])
def test_bad_input_gets_one_clear_line(data, case, tmp_path, capsys):
    argv, message = bad_inputs(data["root"], data["base"])[case]
    out_dir = data["root"] / "full" if case == "out_not_empty" else tmp_path / "out"
    code, _, err = run_cli(["expand", *argv, "--out", str(out_dir)], capsys)
    # Progress bars may come first; the error is one line, the last.
    assert code == 2 and err.count("xllava:") == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("xllava: error: ") and message in last
    assert not (tmp_path / "out").exists()


def test_every_command_has_help_with_an_example(capsys):
    for command in ("expand", "resize", "stats"):
        with pytest.raises(SystemExit):
            run_cli([command, "--help"], capsys)
        assert "examples:" in capsys.readouterr().out
