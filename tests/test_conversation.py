"""Templates and supervision spans: exact strings, spans by construction, LLaVA-compatible ids."""

from __future__ import annotations

import itertools
import random
import re

import pytest
import sentencepiece as spm

from xllava_jax.data.conversation import (
    IGNORE_INDEX,
    LLAMA2_SYSTEM,
    VICUNA_SYSTEM,
    ConversationError,
    encode,
    render,
    template_text,
)
from xllava_jax.data.tokenizer import Tokenizer

IMG, N_IMG = 999, 4

EN = ["What color is the car?", "The car is red.", "How many dogs are there?", "There are two dogs.",
      "Describe the scene in detail.", "A man rides a bicycle past a bakery on a sunny morning."]
KO = ["자동차는 무슨 색인가요?", "자동차는 빨간색입니다.", "강아지가 몇 마리 있나요?", "강아지가 두 마리 있습니다.",
      "장면을 자세히 설명해 주세요.", "맑은 아침에 한 남자가 자전거를 타고 빵집 앞을 지나갑니다."]
ZH = ["汽车是什么颜色的？", "汽车是红色的。", "有几只狗？", "有两只狗。", "请详细描述这个场景。", "一个男人骑着自行车经过面包店。"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(0)
    lines = [" ".join(rng.choice(EN + KO + ZH) for _ in range(3)) for _ in range(3000)]
    lines += ["[INST] <<SYS>> <</SYS>> USER: ASSISTANT: " + LLAMA2_SYSTEM + " " + VICUNA_SYSTEM] * 20
    path = tmp_path_factory.mktemp("tok")
    (path / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(path / "corpus.txt"), model_prefix=str(path / "tokenizer"), vocab_size=600, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", minloglevel=2)
    return Tokenizer(path / "tokenizer.model")


def conv(lang: list[str], rounds: int, image: bool = True) -> list[tuple[str, str]]:
    turns = []
    for r in range(rounds):
        q, a = lang[2 * (r % 3)], lang[2 * (r % 3) + 1]
        if r == 0 and image:
            q = q + " <image>"  # moved to the front by the template
        turns += [("human", q), ("gpt", a)]
    return turns


def test_exact_template_strings():
    turns = [("human", "<image>\nq1"), ("gpt", "a1"), ("human", "q2"), ("gpt", "a2")]
    assert template_text(render("llava_llama_2", turns, system="S")) == (
        "[INST] <<SYS>>\nS\n<</SYS>>\n\n<image>\nq1 [/INST] a1 </s><s>[INST] q2 [/INST] a2 </s>")
    assert template_text(render("vicuna_v1", turns, system="S")) == (
        "S USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>")
    assert template_text(render("plain", [("human", "describe <image>"), ("gpt", "a cat")])) == "<image>a cat\n"
    assert template_text(render("plain", [("gpt", "hi"), ("human", "<image>"), ("gpt", "a cat")])) == "<image>a cat\n"
    assert template_text(render("vicuna_v1", turns[:3], system="S", generation=True)).endswith(
        "USER: q2 ASSISTANT:")
    assert template_text(render("llava_llama_2", turns[:1], system="S", generation=True)).endswith("q1 [/INST]")
    # The image tag moves to the start of its turn, followed by a newline.
    assert "USER: <image>\nwhat is it? ASSISTANT:" in template_text(
        render("vicuna_v1", [("human", "what is it? <image>"), ("gpt", "x")]))


def _runs(ids, labels, supervised: bool) -> list[list[int]]:
    runs, current = [], []
    for i, lab in zip(ids, labels):
        if (lab != IGNORE_INDEX) == supervised:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return runs + [current] if current else runs


@pytest.mark.parametrize("template,lang", list(itertools.product(["llava_llama_2", "vicuna_v1"], ["en", "ko", "zh"])))
def test_clean_spans_decode_to_answers_and_template(tok, template, lang):
    turns = conv({"en": EN, "ko": KO, "zh": ZH}[lang], rounds=3)
    pieces = render(template, turns)
    enc = encode(pieces, tok, num_image_tokens=N_IMG, image_token_id=IMG)
    assert len(enc.input_ids) == len(enc.labels)
    answers = [text for role, text in turns if role == "gpt"]
    closing = " " if template == "llava_llama_2" else ""
    runs = _runs(enc.input_ids, enc.labels, supervised=True)
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        assert run[-1] == tok.eos_id
        assert tok.decode(run[:-1]) == answer + closing
    # The unsupervised part (with the supervised parts put back) is the template text.
    text = tok.decode([t for t in enc.input_ids if t != IMG])
    assert text == template_text(pieces).replace("<image>", "").replace("</s>", "").replace("<s>", "")
    assert enc.input_ids.count(IMG) == N_IMG


def test_plain_supervises_caption_and_newline(tok):
    enc = encode(render("plain", [("human", "<image>\nignored"), ("gpt", KO[5])]), tok,
                 num_image_tokens=N_IMG, image_token_id=IMG)
    assert enc.input_ids[: 1 + N_IMG] == [tok.bos_id] + [IMG] * N_IMG
    assert all(lab == IGNORE_INDEX for lab in enc.labels[: 1 + N_IMG])
    sup = [lab for lab in enc.labels if lab != IGNORE_INDEX]
    assert tok.decode(sup) == KO[5] + "\n"


def _llava_reference_labels(tok, conversation: str, template) -> list[int]:
    """LLaVA's preprocess_llama_2 / preprocess_v1 arithmetic on the legacy tokenizer (the recipe's rule),
    for a prompt string as LLaVA's get_prompt() writes it."""
    def tokenize(text):  # tokenizer_image_token with one id per image (LLaVA's -200)
        chunks = text.split("<image>")
        ids = [tok.bos_id]
        for i, chunk in enumerate(chunks):
            if i:
                ids.append(-200)
            ids += tok.encode_llama_slow(chunk)
        return ids

    ids = tokenize(conversation)
    target = list(ids)
    sep = "[/INST] " if template == "llava_llama_2" else " ASSISTANT: "
    cur = 1
    target[:cur] = [IGNORE_INDEX]
    for rou in conversation.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        assert len(parts) == 2
        round_len = len(tokenize(rou))
        instruction_len = len(tokenize(parts[0] + sep)) - 2
        target[cur: cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    target[cur:] = [IGNORE_INDEX] * (len(target) - cur)
    out = []
    for t, lab in zip(ids, target):  # expand the image id to N_IMG placeholders
        out += [IGNORE_INDEX] * N_IMG if t == -200 else [lab]
    return out


@pytest.mark.parametrize("template,lang", list(itertools.product(["llava_llama_2", "vicuna_v1"], ["en", "ko"])))
def test_llava_mode_ids_and_spans(tok, template, lang):
    turns = conv(EN if lang == "en" else KO, rounds=2)
    pieces = render(template, turns)
    enc = encode(pieces, tok, num_image_tokens=N_IMG, image_token_id=IMG, mode="llava")
    # Ids by hand from the rules: bos, the text before <image> fresh, the image, then the rest of the
    # prompt fresh again (so its dummy-prefix piece appears after the image), <s>/</s> as ids.
    before, after = template_text(pieces).split("<image>")
    want = [tok.bos_id] + tok.sp.encode(before) + [IMG] * N_IMG
    for part in re.split(r"(</s>|<s>)", after):
        want += {"</s>": [tok.eos_id], "<s>": [tok.bos_id]}.get(part) or tok.sp.encode(part)
    assert enc.input_ids == want
    assert enc.input_ids[1 + len(tok.sp.encode(before)) + N_IMG] == tok.sp.piece_to_id("▁")
    assert enc.labels == _llava_reference_labels(tok, template_text(pieces), template)
    runs = _runs(enc.input_ids, enc.labels, supervised=True)
    answers = [text for role, text in turns if role == "gpt"]
    assert [tok.decode(run[:-1]).strip() for run in runs] == answers and all(r[-1] == tok.eos_id for r in runs)


LLAVA_PROMPTS = {  # LLaVA's get_prompt() for a human turn that is only <image> (the newline is stripped)
    "vicuna_v1": ("S USER: ", " ASSISTANT: The car is red.</s>"),
    "llava_llama_2": ("[INST] <<SYS>>\nS\n<</SYS>>\n\n", " [/INST] The car is red. </s>"),
}


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_llama_2"])
@pytest.mark.parametrize("mode", ["clean", "llava"])
def test_image_only_turn_has_no_newline(tok, template, mode):
    before, after = LLAVA_PROMPTS[template]
    pieces = render(template, [("human", "<image>"), ("gpt", "The car is red.")], system="S")
    assert template_text(pieces) == before + "<image>" + after
    enc = encode(pieces, tok, num_image_tokens=N_IMG, image_token_id=IMG, mode=mode)
    after_image = enc.input_ids[len(enc.input_ids) - enc.input_ids[::-1].index(IMG):]
    assert tok.sp.piece_to_id("<0x0A>") not in after_image
    if mode == "llava":  # text on each side of the image tokenised as a fresh string, </s> as its id
        assert enc.input_ids == ([tok.bos_id] + tok.sp.encode(before) + [IMG] * N_IMG
                                 + tok.sp.encode(after.removesuffix("</s>")) + [tok.eos_id])
        assert enc.labels == _llava_reference_labels(tok, before + "<image>" + after, template)
    runs = _runs(enc.input_ids, enc.labels, supervised=True)
    assert len(runs) == 1 and tok.decode(runs[0][:-1]).strip() == "The car is red."


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_llama_2"])
@pytest.mark.parametrize("mode", ["clean", "llava"])
def test_leading_gpt_turn_is_dropped_as_llava_does(tok, template, mode):
    question = [("human", "<image>\nWhat color is the car?"), ("gpt", "The car is red.")]
    pieces = render(template, [("gpt", "Hello! Ask me about the image."), *question], system="S")
    assert template_text(pieces) == template_text(render(template, question, system="S"))
    before = LLAVA_PROMPTS[template][0]
    after = {"vicuna_v1": "\nWhat color is the car? ASSISTANT: The car is red.",
             "llava_llama_2": "\nWhat color is the car? [/INST] The car is red. "}[template]
    enc = encode(pieces, tok, num_image_tokens=N_IMG, image_token_id=IMG, mode=mode)
    assert enc == encode(render(template, question, system="S"), tok, num_image_tokens=N_IMG, image_token_id=IMG,
                         mode=mode)
    if mode == "llava":
        assert enc.input_ids == ([tok.bos_id] + tok.sp.encode(before) + [IMG] * N_IMG + tok.sp.encode(after)
                                 + [tok.eos_id])
        assert enc.labels == _llava_reference_labels(tok, before + "<image>" + after + "</s>", template)


def test_llava_mode_generation_prompt(tok):
    turns = [("human", "<image>\n" + KO[0])]
    enc = encode(render("vicuna_v1", turns, generation=True), tok, num_image_tokens=N_IMG, image_token_id=IMG,
                 mode="llava")
    before = VICUNA_SYSTEM + " USER: "
    assert enc.input_ids == ([tok.bos_id] + tok.sp.encode(before) + [IMG] * N_IMG
                             + tok.sp.encode("\n" + KO[0] + " ASSISTANT:"))
    assert all(lab == IGNORE_INDEX for lab in enc.labels)


def test_bad_conversations():
    with pytest.raises(ConversationError, match="alternate"):
        render("vicuna_v1", [("human", "a"), ("human", "b"), ("gpt", "c")])
    with pytest.raises(ConversationError, match="alternate"):  # only a training sample's first gpt turn is dropped
        render("vicuna_v1", [("gpt", "a"), ("human", "b")], generation=True)

    with pytest.raises(ConversationError, match="last turn"):
        render("vicuna_v1", [("human", "a")])
    with pytest.raises(ConversationError, match="one image"):
        render("vicuna_v1", [("human", "<image> <image>"), ("gpt", "b")])
    with pytest.raises(ConversationError, match="unknown template"):
        render("chatml", [("human", "a"), ("gpt", "b")])
