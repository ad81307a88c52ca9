"""VQAv2 / KVQA: the official VQA accuracy (Antol et al., `vqaEval.py` as the EvalAI server runs it) on
predictions first passed through LLaVA's `EvalAIAnswerProcessor` (`convert_vqav2_for_submission.py`).

Per question, with the 10 human answers gt_1..gt_10: acc_i = min(1, #{j != i: gt_j == prediction} / 3), and the
question's accuracy is the mean of acc_i. The official normalisation has a quirk kept here: the gt answers, and
the prediction with them, get punctuation + digit/article processing ONLY when the gt answers are not all
identical. LLaVA's processor always normalises the prediction beforehand (lowercase; drop ',' and '?';
"'s" -> " 's"; then the same punctuation + digit/article steps), so "Two." becomes "2" before the official code
sees it.

Gold: `--annotations` in the VQAv2 annotation shape (`{"annotations": [{"question_id", "answers": [{"answer"}],
"answer_type"}]}`), which KVQA annotations may also use; without `--annotations`, each answer line's `answers`
(a list of strings or of {"answer": ...} objects, as the runner copies them from KVQA's question lines) and
optional `answer_type`. The questions scored are those of `--questions` when given (VQAv2 questions JSON or the
LLaVA question JSONL that was run), else every annotated question, else every answer line; a question without
an answer scores 0 and is counted in `missing`.
"""

from __future__ import annotations

import re
import sys

from tqdm import tqdm

from xllava_jax.eval.answers import Record, ScoreError, by_question, load_questions, read_answers, read_json
from xllava_jax.eval.scorers.common import ScoreRequest, header, pct

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: '(?!<=' is a lookahead, so any period not before a digit
COMMA_STRIP_OFFICIAL = re.compile(r"(\d)(\,)(\d)")
COMMA_STRIP_EVALAI = re.compile(r"(?<=\d)(\,)+(?=\d)")
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# The official table, apostrophe-less spellings -> apostrophe forms (its own oddities included).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def process_punctuation(text: str, comma_strip: re.Pattern = COMMA_STRIP_OFFICIAL) -> str:
    """The official step: each punctuation mark is deleted when it touches a space in `text` (or when `text`
    has a digit,digit comma anywhere), else replaced by a space; then periods not before a digit go (at most
    32: the official code passes re.UNICODE, which is 32, where `sub` takes its count)."""
    out = text
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or comma_strip.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=32)


def process_digit_article(text: str) -> str:
    """The official step: lowercase, number words -> digits, drop articles, restore contractions' apostrophes."""
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def llava_answer(text: str) -> str:
    """LLaVA's `EvalAIAnswerProcessor` applied to a model's answer before submission."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text, COMMA_STRIP_EVALAI))


def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """The official per-question accuracy in [0, 1] of an (already LLaVA-processed) prediction."""
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in gt_answers]
    prediction = prediction.replace("\n", " ").replace("\t", " ").strip()
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        prediction = process_digit_article(process_punctuation(prediction))
    accs = [min(1.0, sum(1 for j, gt in enumerate(gts) if j != i and gt == prediction) / 3) for i in range(len(gts))]
    return sum(accs) / len(accs)


def _answer_texts(record: Record, value: object) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ScoreError(f"{record.where}: `answers` must be a non-empty list")
    texts = [a.get("answer") if isinstance(a, dict) else a for a in value]
    if not all(isinstance(t, str) for t in texts):
        raise ScoreError(f"{record.where}: every answer must be a string or an object with a string `answer`")
    return texts


def _annotations(paths: tuple) -> dict[str, tuple[list[str], str | None]]:
    gold: dict[str, tuple[list[str], str | None]] = {}
    for path in paths:
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise ScoreError(f"{path}: expected VQA annotations JSON ({{\"annotations\": [...]}})")
        for i, item in enumerate(data["annotations"]):
            record = Record(item if isinstance(item, dict) else {}, f"{path}: annotations[{i}]")
            qid = str(record.require("question_id", (int, str)))
            if qid in gold:
                raise ScoreError(f"{record.where}: question {qid} annotated twice")
            gold[qid] = (_answer_texts(record, record.require("answers")), item.get("answer_type"))
    return gold


def score(req: ScoreRequest) -> dict:
    """Official VQA accuracy overall and per answer type (yes/no, number, other) as percentages."""
    answers = read_answers(req.answers)
    answered = by_question(answers)
    if req.annotations:
        gold = _annotations(req.annotations)
    else:
        gold = {a.qid: (_answer_texts(a, a.require("answers")), a.data.get("answer_type")) for a in answers}
    qids = list(load_questions(req.questions)) if req.questions else list(gold)
    unannotated = [q for q in qids if q not in gold and q in answered]
    if unannotated:
        raise ScoreError(f"{req.questions}: question {unannotated[0]} has an answer but no gold answers "
                         f"({len(unannotated)} such)")
    per_type: dict[str, list[float]] = {}
    total = 0.0
    for qid in tqdm(qids, desc="scoring", unit="q", disable=None, file=sys.stderr):
        gts, answer_type = gold.get(qid, ([], None))
        acc = vqa_accuracy(llava_answer(answered[qid].data["text"]), gts) if qid in answered else 0.0
        total += acc
        per_type.setdefault(answer_type or "unknown", []).append(acc)
    wanted = set(qids)
    ignored = sum(1 for a in answers if a.round_id != 0 or a.qid not in wanted)
    missing = sum(1 for q in qids if q not in answered)
    metrics = header(req, answers, "official", len(qids), missing, ignored)
    metrics["accuracy"] = pct(total, len(qids))
    metrics["per_answer_type"] = {t: {"accuracy": pct(sum(a), len(a)), "questions": len(a)}
                                  for t, a in sorted(per_type.items())}
    return metrics
