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
from xllava_jax.tokenizer.runtime import Tokenizer

IMG, N_IMG = 999, 4

EN = ["What color is the car?", "The car is red.", "How many dogs are there?", "There are two dogs.",
      "Describe the scene in detail.", "A man rides a bicycle past a bakery on a sunny morning."]
KO = ["자동차는 무슨 색인가요?", "자동차는 빨간색입니다.", "강아지가 몇 마리 있나요?", "강아지가 두 마리 있습니다.",
      "장면을 자세히 설명해 주세요.", "맑은 아침에 한 남자가 자전거를 타고 빵집 앞을 지나갑니다."]
ZH = ["汽车是什么颜色的？", "汽车是红色的。", "有几只狗？", "有两只狗。", "请详细描述这个场景。", "一个男人骑着自行车经过面包店。"]


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory):
    """A small BPE model with LLaMA's settings (byte fallback, digits split, dummy prefix)."""
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
    return path / "tokenizer.model"


@pytest.fixture(scope="module")
def tok(tok_model):
    return Tokenizer(tok_model)


@pytest.fixture(scope="module")
def sp(tok_model):
    """The same model read by sentencepiece itself: the LLaVA reference below uses nothing of xllava_jax."""
    return spm.SentencePieceProcessor(model_file=str(tok_model))


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


# ------------------------------------------- an independent reference: LLaVA's own preprocessing
# Written from LLaVA's llava/conversation.py, llava/mm_utils.py and llava/train/train.py, with
# sentencepiece alone; no xllava_jax code (render, template_text, Tokenizer, encode) is used.
LLAVA_IMAGE_ID = -200  # LLaVA's IMAGE_TOKEN_INDEX
LLAVA_SYSTEM = {  # conv_llava_llama_2.system, conv_vicuna_v1.system
    "llava_llama_2": "You are a helpful language and vision assistant. You are able to understand the visual content "
                     "that the user provides, and assist the user with a variety of tasks using natural language.",
    "vicuna_v1": "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.",
}


def llava_prompt(template: str, turns: list[tuple[str, str]], system: str | None = None) -> str:
    """preprocess_multimodal (`<image>` to the front of its turn, then `.strip()`), the first turn skipped
    when it is not the human's (preprocess_llama_2 / preprocess_v1), then Conversation.get_prompt():
    conv_llava_llama_2 is SeparatorStyle.LLAMA_2 with sep "<s>", sep2 "</s>"; conv_vicuna_v1 is
    SeparatorStyle.TWO with sep " ", sep2 "</s>"; roles USER / ASSISTANT."""
    if turns[0][0] != "human":
        turns = turns[1:]
    messages = []
    for _, value in turns:
        if "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        messages.append(value)
    system = LLAVA_SYSTEM[template] if system is None else system
    if template == "vicuna_v1":
        seps = [" ", "</s>"]
        ret = system + seps[0]
        for i, message in enumerate(messages):
            ret += ("USER", "ASSISTANT")[i % 2] + ": " + message + seps[i % 2]
        return ret
    assert template == "llava_llama_2"
    ret = ""
    for i, message in enumerate(messages):
        if i == 0:
            message = (f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else "") + message
        if i % 2 == 0:
            ret += "<s>" + f"[INST] {message} [/INST]"
        else:
            ret += " " + message + " " + "</s>"
    return ret.lstrip("<s>")  # str.lstrip of the characters, as LLaVA writes it


def legacy_llama_ids(sp, text: str) -> list[int]:
    """`tokenizer(text).input_ids` of LLaMA's slow tokenizer with legacy=True: bos, then the special tokens
    written in the text as their ids, and each stretch of text between them encoded as a fresh string
    (the model's dummy prefix in front of each)."""
    specials = {"<s>": sp.bos_id(), "</s>": sp.eos_id(), "<unk>": sp.unk_id()}
    ids = [sp.bos_id()]
    for part in re.split(r"(<s>|</s>|<unk>)", text):
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids += sp.encode(part)
    return ids


def tokenizer_image_token(sp, prompt: str) -> list[int]:
    """LLaVA's mm_utils.tokenizer_image_token: each `<image>`-separated chunk tokenised on its own, the bos
    of every chunk after the first dropped, one IMAGE_TOKEN_INDEX between chunks."""
    chunks = [legacy_llama_ids(sp, chunk) for chunk in prompt.split("<image>")]
    offset = 1 if chunks[0] and chunks[0][0] == sp.bos_id() else 0
    ids = chunks[0][:offset]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(LLAVA_IMAGE_ID)
        ids += chunk[offset:]
    return ids


def llava_reference(sp, conversation: str, template: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of LLaVA's preprocess_llama_2 / preprocess_v1 for one prompt, has_image=True,
    with the image id expanded to N_IMG placeholders (IMG, label IGNORE_INDEX) as our encoding lays it out.

    The whole prompt is tokenised; it is split on sep2 "</s>" into rounds, each round on the separator
    ("[/INST] " for llama_2, " ASSISTANT: " for v1); from cur_len = 1 (the bos) each round masks
    len(tokens(parts[0] + sep)) - 2 instruction tokens and advances by len(tokens(round)); everything from
    the final cur_len on is masked, and a total length that disagrees with cur_len masks the whole sample
    (LLaVA's "tokenization mismatch"). The tokenizer is the legacy one, so preprocess_v1's `round_len -= 1;
    instruction_len -= 1` for non-legacy tokenizers does not apply (preprocess_llama_2 has no such step)."""
    ids = tokenizer_image_token(sp, conversation)
    target = list(ids)
    total_len = len(ids)
    sep = "[/INST] " if template == "llava_llama_2" else " ASSISTANT: "
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    for rou in conversation.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenizer_image_token(sp, rou))
        instruction_len = len(tokenizer_image_token(sp, parts[0])) - 2
        for i in range(cur_len, min(cur_len + instruction_len, total_len)):  # a tensor slice: clipped
            target[i] = IGNORE_INDEX
        cur_len += round_len
    for i in range(cur_len, total_len):
        target[i] = IGNORE_INDEX
    if cur_len != total_len:
        target = [IGNORE_INDEX] * total_len
    out_ids, out_labels = [], []
    for t, lab in zip(ids, target):
        out_ids += [IMG] * N_IMG if t == LLAVA_IMAGE_ID else [t]
        out_labels += [IGNORE_INDEX] * N_IMG if t == LLAVA_IMAGE_ID else [lab]
    return out_ids, out_labels


def test_llava_reference_matches_llava_on_a_hand_example(sp):
    """The reference itself, on a prompt small enough to check by hand: two rounds, image in the first."""
    prompt = llava_prompt("llava_llama_2", [("human", "q1 <image>"), ("gpt", "a1"), ("human", "q2"), ("gpt", "a2")],
                          system="")
    assert prompt == "[INST] <image>\nq1 [/INST] a1 </s><s>[INST] q2 [/INST] a2 </s>"
    ids, labels = llava_reference(sp, prompt, "llava_llama_2")
    enc = sp.encode
    first = enc("[INST] ")  # the text before the image
    after = enc("\nq1 [/INST] a1 ")
    second = enc("[INST] q2 [/INST] a2 ")
    assert ids == [1, *first, *[IMG] * N_IMG, *after, 2, 1, *second, 2]
    supervised = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert supervised == [i for i, lab in zip(ids, labels) if lab == i]  # labels are the ids where not masked
    # Each round's "[/INST] " instruction is masked (its lone trailing "▁" is the -2's second token, merged
    # into "▁a" in the whole prompt); its answer and the </s> that closes the round are supervised.
    assert [sp.id_to_piece(i) for i in supervised] == ["▁a", "<0x31>", "▁", "</s>", "▁a", "<0x32>", "▁", "</s>"]
    assert [sp.id_to_piece(i) for i in ids[ids.index(2) - 4: ids.index(2)]] == ["<0x5D>", "▁a", "<0x31>", "▁"]


def supervised_runs_text(sp, ids: list[int], labels: list[int]) -> list[str]:
    runs, current = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [sp.decode([i for i in run if i != sp.eos_id()]) for run in runs]


@pytest.mark.parametrize("template,lang,rounds,system", [
    *itertools.product(["llava_llama_2", "vicuna_v1"], ["en", "ko"], [2], [None]),
    ("llava_llama_2", "zh", 3, None), ("vicuna_v1", "zh", 3, None), ("llava_llama_2", "ko", 3, ""),
    ("vicuna_v1", "en", 1, "S")])
def test_llava_mode_ids_and_spans(tok, sp, template, lang, rounds, system):
    turns = conv({"en": EN, "ko": KO, "zh": ZH}[lang], rounds=rounds)
    pieces = render(template, turns, system=system)
    enc = encode(pieces, tok, num_image_tokens=N_IMG, image_token_id=IMG, mode="llava")
    prompt = llava_prompt(template, turns, system)
    assert template_text(pieces) == prompt
    want_ids, want_labels = llava_reference(sp, prompt, template)
    assert enc.input_ids == want_ids
    assert enc.input_ids[1 + len(sp.encode(prompt.split("<image>")[0])) + N_IMG] == sp.piece_to_id("▁")
    assert enc.labels == want_labels
    answers = [text for role, text in turns if role == "gpt"]
    assert [text.strip() for text in supervised_runs_text(sp, want_ids, want_labels)] == answers  # no mismatch


LLAVA_PROMPTS = {  # LLaVA's get_prompt() for a human turn that is only <image> (the newline is stripped)
    "vicuna_v1": ("S USER: ", " ASSISTANT: The car is red.</s>"),
    "llava_llama_2": ("[INST] <<SYS>>\nS\n<</SYS>>\n\n", " [/INST] The car is red. </s>"),
}


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_llama_2"])
@pytest.mark.parametrize("mode", ["clean", "llava"])
def test_image_only_turn_has_no_newline(tok, sp, template, mode):
    before, after = LLAVA_PROMPTS[template]
    pieces = render(template, [("human", "<image>"), ("gpt", "The car is red.")], system="S")
    assert template_text(pieces) == before + "<image>" + after
    enc = encode(pieces, tok, num_image_tokens=N_IMG, image_token_id=IMG, mode=mode)
    after_image = enc.input_ids[len(enc.input_ids) - enc.input_ids[::-1].index(IMG):]
    assert tok.sp.piece_to_id("<0x0A>") not in after_image
    if mode == "llava":  # text on each side of the image tokenised as a fresh string, </s> as its id
        assert enc.input_ids == ([tok.bos_id] + tok.sp.encode(before) + [IMG] * N_IMG
                                 + tok.sp.encode(after.removesuffix("</s>")) + [tok.eos_id])
        prompt = llava_prompt(template, [("human", "<image>"), ("gpt", "The car is red.")], system="S")
        assert prompt == before + "<image>" + after
        assert (enc.input_ids, enc.labels) == llava_reference(sp, prompt, template)
    runs = _runs(enc.input_ids, enc.labels, supervised=True)
    assert len(runs) == 1 and tok.decode(runs[0][:-1]).strip() == "The car is red."


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_llama_2"])
@pytest.mark.parametrize("mode", ["clean", "llava"])
def test_leading_gpt_turn_is_dropped_as_llava_does(tok, sp, template, mode):
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
        prompt = llava_prompt(template, [("gpt", "Hello! Ask me about the image."), *question], system="S")
        assert prompt == before + "<image>" + after + "</s>"
        assert (enc.input_ids, enc.labels) == llava_reference(sp, prompt, template)


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
