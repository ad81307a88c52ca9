"""`xllava eval score`: every scoring rule on hand-built cases, one CLI run per benchmark family, bad input."""

import json

import pytest

from xllava_jax.cli import main as cli
from xllava_jax.eval.answers import ScoreError, read_answers
from xllava_jax.eval.scorers import gqa, korean, pope, synth, vqa
from xllava_jax.eval.scorers.multiple_choice import extract_choice


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def answer(qid, text, **extra):
    return {"question_id": qid, "prompt": "q", "text": text, "answer_id": f"a{qid}", "model_id": "m1",
            "metadata": {}, **extra}


def score(capsys, *args):
    """Run `xllava eval score ARGS`; return (exit code, last-line JSON or None, stderr)."""
    code = cli(["eval", "score", *map(str, args)])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, (json.loads(lines[-1]) if code == 0 else None), err


# ---- VQAv2 / KVQA ----------------------------------------------------------------------------------------------

def test_llava_answer_processor():
    assert vqa.llava_answer("Two.") == "2"
    assert vqa.llava_answer("  The Dog's bone\n") == "dog 's bone"  # lowercased, article dropped, "'s" split
    assert vqa.llava_answer("Yes, it is!") == "yes it is"  # ',' dropped; '!' not touching a space -> space
    assert vqa.llava_answer("None") == "0" and vqa.llava_answer("dont know") == "don't know"
    assert vqa.llava_answer("What?") == "what"


def test_official_punctuation_and_digit_article_steps():
    assert vqa.process_punctuation("black-and-white") == "black and white"
    assert vqa.process_punctuation("1,000 black-and-white") == "1000 blackandwhite"  # a digit,digit comma anywhere
    assert vqa.process_punctuation("x - y") == "x  y"  # a mark touching a space is deleted
    assert vqa.process_punctuation("3.5 ft.") == "3.5 ft"  # periods before a digit stay
    assert vqa.process_punctuation("." * 40) == "." * 8  # the official count=re.UNICODE (32) quirk
    # lowercased first, so the official table's capitalised keys ("Im") never match
    assert vqa.process_digit_article("The TWO dogs isnt an Im") == "2 dogs isn't im"


def test_vqa_accuracy_rules():
    # The prediction is always LLaVA-processed; the gt side only when the gt answers differ.
    assert vqa.vqa_accuracy(vqa.llava_answer("Two."), ["2"] * 10) == 1.0
    assert vqa.vqa_accuracy(vqa.llava_answer("two"), ["Two"] * 10) == 0.0  # identical gts: left as "Two"
    assert vqa.vqa_accuracy(vqa.llava_answer("two"), ["Two"] * 9 + ["two"]) == 1.0  # differ: all become "2"
    assert vqa.vqa_accuracy(vqa.llava_answer("the dog"), ["the dog"] * 10) == 0.0  # "dog" vs untouched "the dog"
    assert vqa.vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)  # (2/3*8 + 1/3*2) / 10
    assert vqa.vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)  # (1*7 + 2/3*3) / 10
    assert vqa.vqa_accuracy("green", ["red"] * 3 + ["blue"] * 7) == 0.0


def test_vqav2_cli_with_annotations_and_questions(tmp_path, capsys):
    annotations = tmp_path / "ann.json"
    annotations.write_text(json.dumps({"annotations": [
        {"question_id": 1, "answer_type": "yes/no", "answers": [{"answer": "yes", "answer_id": i} for i in range(10)]},
        {"question_id": 2, "answer_type": "number",
         "answers": [{"answer": a, "answer_id": i} for i, a in enumerate(["2"] * 2 + ["3"] * 8)]},
        {"question_id": 3, "answer_type": "other", "answers": [{"answer": "cat"}] * 10},
        {"question_id": 4, "answer_type": "other", "answers": [{"answer": "dog"}] * 10},
    ]}))
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps({"questions": [{"question_id": q, "image_id": q, "question": "?"}
                                                   for q in (1, 2, 3)]}))
    answers = write_jsonl(tmp_path / "answers.jsonl", [answer(1, "Yes."), answer(2, "Two"), answer(4, "dog")])
    code, m, err = score(capsys, "--benchmark", "vqav2", "--answers", answers, "--annotations", annotations,
                         "--questions", questions, "--out", tmp_path / "s.json")
    assert code == 0
    # q1: 100, q2: "2" matches 2 gts -> 0.6, q3: no answer -> 0 (missing); q4 not asked -> ignored.
    assert m["accuracy"] == round(100 * 1.6 / 3, 2) and m["questions"] == 3 and m["missing"] == 1
    assert m["ignored_answers"] == 1 and "1 answer line(s)" in err
    assert m["per_answer_type"] == {"number": {"accuracy": 60.0, "questions": 1},
                                    "other": {"accuracy": 0.0, "questions": 1},
                                    "yes/no": {"accuracy": 100.0, "questions": 1}}
    assert m["rules"] == "official" and m["model_id"] == "m1" and m["benchmark"] == "vqav2"
    assert json.loads((tmp_path / "s.json").read_text()) == m
    # Without --questions every annotated question counts: q3 missing, q4 right.
    code, m, _ = score(capsys, "--benchmark", "vqav2", "--answers", answers, "--annotations", annotations)
    assert m["accuracy"] == round(100 * 2.6 / 4, 2) and m["missing"] == 1 and m["ignored_answers"] == 0


def test_kvqa_cli_reads_answers_from_lines(tmp_path, capsys):
    answers = write_jsonl(tmp_path / "a.jsonl", [
        answer("k1", "고양이", answers=["고양이"] * 10, answer_type="other"),
        answer("k2", "두 마리", answers=[{"answer": "2"}] * 10)])
    code, m, _ = score(capsys, "--benchmark", "kvqa", "--answers", answers)
    assert code == 0 and m["accuracy"] == 50.0 and m["per_answer_type"]["unknown"]["accuracy"] == 0.0


# ---- GQA --------------------------------------------------------------------------------------------------------

def test_gqa_rules():
    assert gqa.llava_prediction("Yes..") == "yes" and gqa.llava_prediction("A cat.") == "a cat"  # no article rule
    assert gqa.answer_type({"answer": "red", "types": {"structural": "choose"}}) == "binary"  # as the official code
    assert gqa.answer_type({"answer": "red", "types": {"structural": "query"}}) == "open"
    assert gqa.answer_type({"answer": "no"}) == "binary" and gqa.answer_type({"answer": "dog"}) == "open"


def test_gqa_cli(tmp_path, capsys):
    def q(answer, structural, balanced=True):
        return {"answer": answer, "types": {"structural": structural, "semantic": "attr"}, "isBalanced": balanced}

    questions = tmp_path / "testdev_balanced_questions.json"
    questions.write_text(json.dumps({"1": q("yes", "verify"), "2": q("cat", "query"), "3": q("red", "choose"),
                                     "4": q("no", "logical", balanced=False), "5": q("table", "query")}))
    answers = write_jsonl(tmp_path / "a.jsonl", [answer("1", "Yes."), answer("2", "A cat"), answer("3", "Red"),
                                                 answer("4", "no")])
    code, m, _ = score(capsys, "--benchmark", "gqa", "--answers", answers, "--questions", questions)
    assert code == 0
    assert (m["accuracy"], m["binary"], m["open"]) == (50.0, 100.0, 0.0)
    assert (m["questions"], m["missing"], m["unbalanced_skipped"]) == (4, 1, 1)
    assert m["per_structural"] == {"choose": 100.0, "query": 0.0, "verify": 100.0}


# ---- POPE -------------------------------------------------------------------------------------------------------

def test_pope_yes_no_reading():
    assert pope.llava_yes_no("No, there is not.") == "no"
    assert pope.llava_yes_no("Yes. No doubt about it") == "yes"  # only the first sentence
    assert pope.llava_yes_no("Yes, no question") == "no"  # commas dropped: the word "no"
    assert pope.llava_yes_no("There is no dog") == "no"
    assert pope.llava_yes_no("NO") == "yes" and pope.llava_yes_no("Nope") == "yes"  # only No / no / not
    assert pope.llava_yes_no("no\nthere") == "yes"  # split on single spaces only


def test_pope_split_metrics():
    m = pope.split_metrics([("yes", "yes"), ("yes", "no"), ("no", "yes"), ("no", "no"), ("no", "no"), ("yes", None)])
    assert m == {"questions": 6, "missing": 1, "accuracy": 50.0, "precision": 50.0, "recall": 50.0, "f1": 50.0,
                 "yes_ratio": 40.0}
    assert pope.split_metrics([("no", "no")])["precision"] == 0.0


def test_pope_cli_per_split(tmp_path, capsys):
    rnd = write_jsonl(tmp_path / "coco_pope_random.json", [{"question_id": 1, "text": "?", "label": "yes"},
                                                           {"question_id": 2, "text": "?", "label": "no"}])
    adv = write_jsonl(tmp_path / "coco_pope_adversarial.json", [{"question_id": 1, "text": "?", "label": "yes"},
                                                                {"question_id": 2, "text": "?", "label": "no"}])
    answers = write_jsonl(tmp_path / "a.jsonl", [
        answer(1, "Yes, there is.", category="random"), answer(2, "No.", category="random"),
        answer(1, "Yes", category="adversarial"), answer(2, "Yes", category="adversarial")])
    code, m, _ = score(capsys, "--benchmark", "pope", "--answers", answers, "--annotations", rnd, adv)
    assert code == 0 and set(m["per_split"]) == {"random", "adversarial"}
    assert m["per_split"]["random"]["accuracy"] == 100.0 and m["per_split"]["adversarial"]["accuracy"] == 50.0
    assert m["per_split"]["adversarial"]["yes_ratio"] == 100.0 and m["per_split"]["adversarial"]["f1"] == 66.67
    assert m["accuracy"] == 75.0 and m["f1"] == round((100 + 66.67) / 2, 2) and m["rules"] == "llava"
    no_split = write_jsonl(tmp_path / "b.jsonl", [answer(1, "Yes")])
    code, _, err = score(capsys, "--benchmark", "pope", "--answers", no_split, "--annotations", rnd, adv)
    assert code == 2 and f"{no_split}:1:" in err and "category" in err


def _pope_llava_files(tmp_path):
    """POPE as LLaVA ships it: per-split annotation files (ids restart per split) and llava_pope_test.jsonl, their
    lines in the same order with ids numbered over all splits and the split as `category`."""
    splits = {"random": [("1.jpg", "dog", "yes"), ("1.jpg", "cat", "no")],
              "adversarial": [("2.jpg", "car", "yes"), ("2.jpg", "bus", "no"), ("3.jpg", "cup", "no")]}
    annotations, questions = [], []
    for split, rows in splits.items():
        lines = [{"question_id": i + 1, "image": image, "text": f"Is there a {obj} in the image?", "label": label}
                 for i, (image, obj, label) in enumerate(rows)]
        annotations.append(write_jsonl(tmp_path / f"coco_pope_{split}.json", lines))
        questions += [{"question_id": len(questions) + i, "image": line["image"], "text": line["text"],
                       "category": split} for i, line in enumerate(lines)]
    return annotations, questions


def test_pope_split_from_llava_question_file(tmp_path, capsys):
    annotations, questions = _pope_llava_files(tmp_path)
    qfile = write_jsonl(tmp_path / "llava_pope_test.jsonl", questions)
    # LLaVA's runner copies no `category` onto its answer lines; question 4 is unanswered
    answers = write_jsonl(tmp_path / "a.jsonl", [answer(3, "No, there is not."), answer(0, "Yes"), answer(1, "No"),
                                                 answer(2, "Yes, a car.")])
    code, m, err = score(capsys, "--benchmark", "pope", "--answers", answers, "--questions", qfile,
                         "--annotations", *annotations)
    assert code == 0, err
    assert m["per_split"]["random"]["accuracy"] == 100.0 and m["per_split"]["random"]["questions"] == 2
    adversarial = m["per_split"]["adversarial"]
    assert (adversarial["accuracy"], adversarial["missing"], adversarial["questions"]) == (66.67, 1, 3)
    assert (m["questions"], m["missing"], m["ignored_answers"]) == (5, 1, 0)
    # without --annotations the question lines' own labels are the gold
    labelled = write_jsonl(tmp_path / "q_labels.jsonl", [{**q, "label": "yes"} for q in questions])
    code, m, _ = score(capsys, "--benchmark", "pope", "--answers", answers, "--questions", labelled)
    assert code == 0 and m["per_split"]["random"]["accuracy"] == 50.0


def test_pope_question_file_that_does_not_fit_is_one_line(tmp_path, capsys):
    annotations, questions = _pope_llava_files(tmp_path)
    answers = write_jsonl(tmp_path / "a.jsonl", [answer(0, "Yes")])
    moved = write_jsonl(tmp_path / "moved.jsonl", [{**questions[0], "image": "2.jpg"}, *questions[1:]])
    code, _, err = score(capsys, "--benchmark", "pope", "--answers", answers, "--questions", moved,
                         "--annotations", *annotations)
    assert code == 2 and f"{moved}:1:" in err and "coco_pope_random.json:1" in err and "2.jpg" in err
    assert len(err.strip().splitlines()) == 1
    short = write_jsonl(tmp_path / "short.jsonl", questions[:4])
    code, _, err = score(capsys, "--benchmark", "pope", "--answers", answers, "--questions", short,
                         "--annotations", *annotations)
    assert code == 2 and "2 question(s) of split adversarial" in err and "coco_pope_adversarial.json has 3" in err
    no_split = write_jsonl(tmp_path / "no_split.jsonl", [{k: v for k, v in q.items() if k != "category"}
                                                         for q in questions])
    code, _, err = score(capsys, "--benchmark", "pope", "--answers", answers, "--questions", no_split,
                         "--annotations", *annotations)
    assert code == 2 and f"{no_split}:1: no `category` field" in err


# ---- Korean sets ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("benchmark, prediction, label, paper, strict", [
    ("bokvqa_ko", "사과 ", "사과", False, True),  # the reference scripts strip neither side
    ("bokvqa_ko", "야구", "야구 ", False, True),
    ("koliv", " 예", "예", False, True),
    ("koviz", " 예", "예", False, True),
    ("koviz", "예 ", "예", False, True),
    ("bokvqa_ko", "사과.", "사과", False, True),
    ("bokvqa_ko", "사과  나무", "사과 나무", False, True),
    ("bokvqa_ko", "사과입니다", "사과", False, False),
    ("koliv", "네", "예", False, True),
    ("koviz", "", "예", True, False),  # the empty-prediction quirk
    ("koviz", "네", "예", True, True),
    ("koviz", "yes", "예", True, True),
    ("koviz", "응", "예", False, True),
    ("koviz", "no", "아니요", True, True),
    ("koviz", "아니오", "아니요", False, True),
    ("koviz", "사과", "빨간 사과", True, False),  # substring rule
    ("koviz", "빨간 사과", "사과", False, False),
    ("bokvqa_en", "It is a Dog.", "dog", True, True),
    ("bokvqa_en", "hotdog", "dog", True, False),  # substring quirk
    ("bokvqa_en", "Dog!", "dog", True, True),
    ("bokvqa_en", "cat", "dog", False, False),
    ("bokvqa_en", "", "dog", False, False),
])
def test_korean_rules(benchmark, prediction, label, paper, strict):
    assert korean.paper_correct(benchmark, prediction, label) is paper
    assert korean.strict_correct(benchmark, prediction, label) is strict


def test_koviz_cli_paper_and_strict(tmp_path, capsys):
    answers = write_jsonl(tmp_path / "a.jsonl", [
        answer(1, "", label="예"), answer(2, "네.", label="예"), answer(3, "사과", label="빨간 사과"),
        answer(4, "아니오", label="아니요")])
    code, paper, _ = score(capsys, "--benchmark", "koviz", "--answers", answers)
    assert code == 0 and paper["rules"] == "paper" and paper["accuracy"] == 50.0 and paper["empty_predictions"] == 1
    code, strict, _ = score(capsys, "--benchmark", "koviz", "--answers", answers, "--rules", "strict")
    assert code == 0 and strict["rules"] == "strict" and strict["accuracy"] == 50.0
    assert strict["correct"] == 2  # the other two: "네." and "아니오"
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": q, "text": "?", "label": "예"} for q in (1, 2, 5)])
    code, m, _ = score(capsys, "--benchmark", "bokvqa_ko", "--answers", answers, "--questions", questions)
    assert (m["questions"], m["missing"], m["ignored_answers"], m["accuracy"]) == (3, 1, 2, 0.0)


# ---- multiple choice --------------------------------------------------------------------------------------------

OPTIONS, LETTERS = ["Paris", "London", "Berlin", "Rome"], ["A", "B", "C", "D"]


@pytest.mark.parametrize("text", ["B", "B.", "(B)", "B)", "Answer: B", "The answer is B", "The answer is (B).",
                                  "정답은 B입니다", "B번", "답: B", "옵션 B", "B. London", "(B) London",
                                  "london", "I think it is London.", "Lond"])
def test_choice_extraction_finds_b(text):
    assert extract_choice(text, OPTIONS, LETTERS) == "B"


@pytest.mark.parametrize("text", ["Answer: A. Answer: C", "정답은 A입니다. 아니, B번", "Paris or London", "Bob",
                                  "E", "", "The answer is E"])
def test_choice_extraction_gives_up(text):
    assert extract_choice(text, OPTIONS, LETTERS) is None


def test_multiple_choice_cli_circular(tmp_path, capsys):
    def line(qid, round_id, gold, text, category):
        options = ["yes", "no"] if round_id == 0 else ["no", "yes"]
        return answer(qid, text, round_id=round_id, answer=gold, options=options, option_char=["A", "B"],
                      category=category)

    answers = write_jsonl(tmp_path / "a.jsonl", [
        line(0, 0, "A", "A", "x"), line(0, 1, "B", "B", "x"),  # right in both rounds
        line(1, 0, "B", "no", "x"), line(1, 1, "A", "B", "x"),  # right, then wrong
        line(2, 0, "A", "(A)", "y"),  # round 1 absent
        line(3, 0, "B", "A or B?", "y"), line(3, 1, "A", "정답은 A입니다", "y")])  # unparsed, then right
    code, m, _ = score(capsys, "--benchmark", "kmmbench", "--answers", answers)
    assert code == 0 and m["circular_run"] is True
    assert (m["accuracy"], m["circular_accuracy"], m["single_round"]) == (25.0, 25.0, 75.0)
    assert (m["questions"], m["rounds"], m["unparsed"], m["missing_rounds"]) == (4, 7, 1, 1)
    assert m["per_category"] == {"x": {"accuracy": 50.0, "single_round": 100.0, "questions": 2},
                                 "y": {"accuracy": 0.0, "single_round": 50.0, "questions": 2}}
    bad_gold = write_jsonl(tmp_path / "b.jsonl", [line(0, 0, "C", "A", "x")])
    code, _, err = score(capsys, "--benchmark", "mmbench", "--answers", bad_gold)
    assert code == 2 and f"{bad_gold}:1:" in err


# ---- synth_vqa --------------------------------------------------------------------------------------------------

def test_synth_normalise():
    assert synth.normalise("  Red. ") == "red" and synth.normalise("빨간색。") == "빨간색"
    assert synth.normalise("Top  Left") == "top left"


def test_synth_cli_against_generated_heldout(tmp_path, capsys):
    from xllava_jax.data.synthetic import synthesize

    summary = synthesize(tmp_path / "synth", num_images=2, num_heldout=6, text_lines=1)
    questions = tmp_path / "synth" / "vqa_heldout_en.jsonl"
    gold = [json.loads(x) for x in questions.read_text().splitlines()]
    answers = [answer(g["question_id"], g["answer"].upper() + "." if i % 2 == 0 else "wrong", kind=g["kind"])
               for i, g in enumerate(gold[1:])]  # the first question unanswered
    path = write_jsonl(tmp_path / "a.jsonl", answers)
    code, m, _ = score(capsys, "--benchmark", "synth_vqa", "--answers", path, "--questions", questions)
    assert code == 0 and m["missing"] == 1 and m["questions"] == len(gold)
    right = len(range(0, len(gold) - 1, 2))
    assert m["accuracy"] == round(100 * right / len(gold), 2) and m["per_lang"]["en"]["questions"] == len(gold)
    kinds = m["per_lang"]["en"]["kinds"]
    for kind, expected in summary["heldout"]["en"].items():
        assert kinds[kind]["majority_answer"] == expected["majority_answer"]
        assert kinds[kind]["majority_baseline"] == pytest.approx(100 * expected["majority_baseline"], abs=0.01)
    for kind in ("colour", "shape", "binding_shape", "position", "binding_position"):
        if kind in kinds:
            assert kinds[kind]["present_shortcut"] == pytest.approx(
                100 * summary["heldout"]["en"][kind]["present_shortcut"], abs=0.01)
    assert "present_shortcut" not in kinds.get("count", {}) and "colour" in kinds
    per_kind = [(g["kind"], i % 2 == 0) for i, g in enumerate(gold[1:])]
    first = gold[0]["kind"]
    n_first = sum(1 for g in gold if g["kind"] == first)
    right_first = sum(ok for k, ok in per_kind if k == first)
    assert kinds[first]["accuracy"] == round(100 * right_first / n_first, 2)


def test_synth_baselines_by_hand(tmp_path, capsys):
    rows = [answer("1", "red", answer="Red", kind="colour", lang="en", answers_present=["red", "red", "blue"]),
            answer("2", "red", answer="green", kind="colour", lang="en", answers_present=["green"]),
            answer("3", "red", answer="red", kind="colour", lang="en", answers_present=["red", "blue", "green"]),
            answer("4", "2", answer="2", kind="count", lang="ko")]
    code, m, _ = score(capsys, "--benchmark", "synth_vqa", "--answers", write_jsonl(tmp_path / "a.jsonl", rows))
    colour = m["per_lang"]["en"]["kinds"]["colour"]
    assert code == 0 and m["accuracy"] == 75.0 and m["per_lang"]["ko"]["accuracy"] == 100.0
    assert colour == {"accuracy": 66.67, "questions": 3, "majority_answer": "red", "majority_baseline": 66.67,
                      "present_shortcut": round(100 * (1 / 2 + 1 + 1 / 3) / 3, 2)}


# ---- reading answers and bad input ------------------------------------------------------------------------------

def test_malformed_answer_line_exits_2_with_file_and_line(tmp_path, capsys):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(answer(1, "yes", label="예")) + "\n{not json\n")
    code, _, err = score(capsys, "--benchmark", "koliv", "--answers", path)
    assert code == 2 and err.startswith("xllava: error: ") and f"{path}:2: invalid JSON" in err
    assert len(err.strip().splitlines()) == 1


def test_answer_reader_rules(tmp_path):
    dup = write_jsonl(tmp_path / "dup.jsonl", [answer(1, "a"), answer("1", "b")])
    with pytest.raises(ScoreError, match=r"dup.jsonl:2: duplicate answer for question 1 round 0 \(first at .*:1\)"):
        read_answers(dup)
    rounds = write_jsonl(tmp_path / "rounds.jsonl", [answer(1, "a"), answer(1, "b", round_id=1)])
    assert [a.round_id for a in read_answers(rounds)] == [0, 1]
    split = write_jsonl(tmp_path / "split.jsonl", [answer(1, "a", category="x"), answer(1, "b", category="y")])
    assert len(read_answers(split, extra_key=("category",))) == 2
    with pytest.raises(ScoreError, match="duplicate"):
        read_answers(split)
    no_text = write_jsonl(tmp_path / "t.jsonl", [{"question_id": 1}])
    with pytest.raises(ScoreError, match=r"t.jsonl:1: no `text` field"):
        read_answers(no_text)
    listed = tmp_path / "l.jsonl"
    listed.write_text("[1, 2]\n")
    with pytest.raises(ScoreError, match=r"l.jsonl:1: expected a JSON object"):
        read_answers(listed)


def test_flags_that_do_not_fit_the_benchmark(tmp_path, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", [answer(1, "yes", answers=["yes"] * 10)])
    code, _, err = score(capsys, "--benchmark", "vqav2", "--answers", path, "--rules", "strict")
    assert code == 2 and "--rules applies to" in err
    code, _, err = score(capsys, "--benchmark", "mmbench", "--answers", path, "--questions", path)
    assert code == 2 and "--questions is not read by mmbench" in err
    code, _, err = score(capsys, "--benchmark", "gqa", "--answers", tmp_path / "none.jsonl")
    assert code == 2 and "none.jsonl: no such file" in err
