"""Words, sentence templates and renderers of the synthetic corpus in English, Korean and Chinese.

Templates are `str.format` strings rendered by `say(lang, key, **fields)`. A format spec carries grammar:
in Korean `{shape:은/는}` attaches the particle that agrees with the word (`josa`), in English `{np:a}` /
`{np:A}` puts "a" or "an" in front. Everything here is keyed by language-independent names (colour, shape,
size, background tone and texture names; grid cells 0..8 in reading order), so one semantic draw renders
into parallel sentences in every language. The renderers at the end turn a scene (`synth_scenes.Scene`) or a
question about it (`synth_scenes.Question`) into text.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import TYPE_CHECKING

from xllava_jax.data.korean import josa, native_number

if TYPE_CHECKING:
    from xllava_jax.data.synth_scenes import Obj, Question, Scene

SHORT_ANSWER_EN = "Answer the question using a single word or phrase."
SHORT_ANSWER_KO = "단어나 짧은 구로 답하세요."
SHORT_ANSWER_ZH = "请用一个词或短语回答。"
SUFFIX = {"en": SHORT_ANSWER_EN, "ko": SHORT_ANSWER_KO, "zh": SHORT_ANSWER_ZH}
LANGS = ("en", "ko", "zh")

COLOURS = {"red": ("빨간색", "红色"), "orange": ("주황색", "橙色"), "yellow": ("노란색", "黄色"),
           "green": ("초록색", "绿色"), "blue": ("파란색", "蓝色"), "purple": ("보라색", "紫色"),
           "brown": ("갈색", "棕色"), "black": ("검은색", "黑色")}
WARM, COOL = frozenset({"red", "orange", "yellow", "brown"}), frozenset({"green", "blue", "purple"})
SHAPES = {"circle": ("원", "圆形"), "square": ("정사각형", "正方形"), "triangle": ("삼각형", "三角形"),
          "star": ("별", "星形"), "diamond": ("마름모", "菱形"), "heart": ("하트", "心形")}
SIZES = {"small": ("작은", "小"), "large": ("큰", "大")}
TONES = {"white": ("흰색", "白色"), "light gray": ("연회색", "浅灰色"), "beige": ("베이지색", "米色")}
WORDS = {lang: {key: (key, *pair)[i] for table in (COLOURS, SHAPES, SIZES, TONES) for key, pair in table.items()}
         for i, lang in enumerate(LANGS)}
TEXTURES = {  # the background as the atmosphere answer describes it
    "plain": ("a plain {tone} background", "무늬 없는 {tone} 배경", "纯{tone}的背景"),
    "noise": ("{tone:a} background with a faint texture", "은은한 질감이 있는 {tone} 배경", "带有淡淡纹理的{tone}背景"),
    "stripes": ("{tone:a} background with soft stripes", "옅은 줄무늬가 있는 {tone} 배경", "带有浅色条纹的{tone}背景"),
    "gradient": ("{tone:a} background with a gentle gradient", "부드러운 그라데이션이 있는 {tone} 배경",
                 "带有柔和渐变的{tone}背景")}
POSITIONS = (  # grid cell (row * 3 + col): short answer EN, locative EN, KO, ZH
    ("top left", "in the top left", "왼쪽 위", "左上角"), ("top", "at the top", "위쪽", "上方"),
    ("top right", "in the top right", "오른쪽 위", "右上角"), ("left", "on the left", "왼쪽", "左侧"),
    ("center", "in the center", "가운데", "中间"), ("right", "on the right", "오른쪽", "右侧"),
    ("bottom left", "in the bottom left", "왼쪽 아래", "左下角"), ("bottom", "at the bottom", "아래쪽", "下方"),
    ("bottom right", "in the bottom right", "오른쪽 아래", "右下角"))
RELATIVE = {  # (sign of row difference, sign of column difference): EN, KO, ZH
    (-1, -1): ("above and to the left of", "왼쪽 위", "左上方"), (-1, 0): ("above", "위쪽", "上方"),
    (-1, 1): ("above and to the right of", "오른쪽 위", "右上方"), (0, -1): ("to the left of", "왼쪽", "左侧"),
    (0, 1): ("to the right of", "오른쪽", "右侧"), (1, -1): ("below and to the left of", "왼쪽 아래", "左下方"),
    (1, 0): ("below", "아래쪽", "下方"), (1, 1): ("below and to the right of", "오른쪽 아래", "右下方")}
MOODS = (("calm and minimal", "차분하고 단순한", "安静而简洁"), ("open and relaxed", "여유롭고 편안한", "开阔而轻松"),
         ("lively and balanced", "생기 있고 균형 잡힌", "生动而均衡"), ("busy and crowded", "복잡하고 붐비는", "热闹而拥挤"))
WARMTH = {"warm": ("the palette is warm", "따뜻한 색감입니다", "色调温暖"),
          "cool": ("the palette is cool", "차가운 색감입니다", "色调偏冷"),
          "mixed": ("warm and cool colors are mixed", "따뜻한 색과 차가운 색이 섞여 있습니다", "冷暖色调交织")}
YES_NO = {"en": ("yes", "no"), "ko": ("예", "아니요"), "zh": ("有", "没有")}
EN_NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
ZH_NUMBERS = ("一", "两", "三", "四", "五", "六", "七", "八", "九", "十")
CAPTION_PROMPTS = {
    "en": ("Describe the image briefly.", "What is in this picture?", "Give a short description of the image.",
           "List the shapes in the image with their colors and positions."),
    "ko": ("이미지를 간단히 설명해 주세요.", "이 그림에는 무엇이 있습니까?", "이미지에 대한 짧은 설명을 써 주세요.",
           "이미지의 도형을 색과 위치와 함께 나열해 주세요."),
    "zh": ("请简要描述这张图片。", "这张图片里有什么？", "请给这张图片写一段简短的描述。", "请列出图中的图形及其颜色和位置。")}

TEMPLATES = {
    "en": {
        "q.colour": "What color is the {shape}?", "a.colour": "The {shape} is {colour}.",
        "q.shape": "What shape is {loc}?", "a.shape": "The shape {loc} is {shape:a}.",
        "q.count": "How many shapes are in the image?", "a.count": "There {be} {n_shapes} in the image.",
        "q.position": "Where is the {colour} {shape}?", "a.position": "The {colour} {shape} is {loc}.",
        "q.binding_shape": "What shape is the {colour} object?", "a.binding_shape": "The {colour} object is {shape:a}.",
        "q.binding_position": "Where is the {shape}?", "a.binding_position": "The {shape} is {loc}.",
        "q.yes_no": "Is there {ref:a} in the image?", "a.yes": "Yes, there is {ref:a} {loc}.",
        "a.no": "No, there is no {ref} in the image.",
        "q.label": "What is written on the {shape}?", "a.label": "The {shape} has {label} written on it.",
        "q.describe": "Describe the {colour} {shape}.", "a.describe": "It is {np:a}. It is {loc}.",
        "np": "{size} {colour} {shape}", "np.label": "{size} {colour} {shape} with {label}",
        "label.letter": "the letter {text}", "label.number": "the number {text}",
        "caption": "{n_shapes_cap} on {tone:a} background: {items}.", "caption.item": "{np:a} {loc}",
        "q.graph": "Write a scene graph of this image: list the objects with their positions, then the relations "
                   "between them.",
        "graph": "Objects: {items}. Relations: {relations}", "graph.item": "{np:a} ({pos})",
        "rel": "The {a} is {rel} the {b}.", "rel.next": "The {a} and the {b} are next to each other.",
        "rel.none": "There is only one object, so there are no relations.",
        "q.atmosphere": "What is the overall atmosphere of this image?",
        "atmosphere": "The image feels {mood}. It shows {n_shapes} on {background}. {palette}",
        "palette.one": "The only color is {colours}, which keeps it simple.",
        "palette.many": "{colours_cap} make the image colorful, and {warmth}.",
        "q.colours": "Which colors are used in the image?", "a.colours": "The image uses {colours}.",
        "t.colour": "{thing} is usually {colour}.", "t.sum": "{a} plus {b} is {c}.",
        "t.story": "{name} has {n_items}. {name} gives {k_items} to {friend}. Now {name} has {r_items} left.",
        "t.quiz": "{caption} Question: {question} Answer: {answer}."},
    "ko": {
        "q.colour": "{shape:은/는} 무슨 색입니까?", "a.colour": "{shape:은/는} {colour:으로/로} 칠해져 있습니다.",
        "q.shape": "{loc}에 있는 도형은 무엇입니까?", "a.shape": "{loc}에 있는 도형은 {shape}입니다.",
        "q.count": "이미지에 도형이 몇 개 있습니까?", "a.count": "이미지에 도형이 {n} 개 있습니다.",
        "q.position": "{colour} {shape:은/는} 어디에 있습니까?", "a.position": "{colour} {shape:은/는} {loc}에 있습니다.",
        "q.binding_shape": "{colour} 도형은 어떤 모양입니까?", "a.binding_shape": "{colour} 도형은 {shape}입니다.",
        "q.binding_position": "{shape:은/는} 어디에 있습니까?", "a.binding_position": "{shape:은/는} {loc}에 있습니다.",
        "q.yes_no": "이미지에 {ref:이/가} 있습니까?", "a.yes": "예, {loc}에 {ref:이/가} 있습니다.",
        "a.no": "아니요, 이미지에 {ref:은/는} 없습니다.",
        "q.label": "{shape}에 무엇이 적혀 있습니까?", "a.label": "{shape}에는 {label:이/가} 적혀 있습니다.",
        "q.describe": "{colour} {shape:을/를} 설명해 주세요.", "a.describe": "{loc}에 있는 {np}입니다.",
        "np": "{size} {colour} {shape}", "np.label": "{label:이/가} 적힌 {size} {colour} {shape}",
        "label.letter": "'{text}'", "label.number": "'{text}'",
        "caption": "{tone} 배경에 도형이 {n} 개 있습니다. {items} 있습니다.", "caption.item": "{loc}에는 {np:이/가}",
        "q.graph": "이 이미지의 장면 그래프를 작성해 주세요. 먼저 물체와 위치를 나열하고, 그다음 물체 사이의 관계를 "
                   "설명해 주세요.",
        "graph": "물체: {items}. 관계: {relations}", "graph.item": "{np}({pos})",
        "rel": "{a:은/는} {b}의 {rel}에 있습니다.", "rel.next": "{a:와/과} {b:은/는} 서로 이웃해 있습니다.",
        "rel.none": "물체가 하나뿐이라 관계가 없습니다.",
        "q.atmosphere": "이 이미지의 전체적인 분위기는 어떻습니까?",
        "atmosphere": "{mood} 분위기의 이미지입니다. {background}에 도형이 {n} 개 있습니다. {palette}",
        "palette.one": "{colours} 한 가지 색만 있어 단순해 보입니다.",
        "palette.many": "{colours:이/가} 어우러져 다채로워 보이며, {warmth}.",
        "q.colours": "이미지에는 어떤 색이 쓰였습니까?", "a.colours": "{colours:이/가} 쓰였습니다.",
        "t.colour": "{thing:은/는} 보통 {colour}입니다.", "t.sum": "{a} 더하기 {b:은/는} {c}입니다.",
        "t.story": "{name:은/는} {item:을/를} {n} 개 가지고 있습니다. {name:이/가} {friend}에게 {item:을/를} {k} 개 "
                   "줍니다. 이제 {name}에게는 {item:이/가} {r} 개 남았습니다.",
        "t.quiz": "{caption} 질문: {question} 답: {answer}."},
    "zh": {
        "q.colour": "{shape}是什么颜色？", "a.colour": "{shape}是{colour}的。",
        "q.shape": "{loc}的图形是什么形状？", "a.shape": "{loc}的图形是{shape}。",
        "q.count": "图中有几个图形？", "a.count": "图中有{n}个图形。",
        "q.position": "{colour}的{shape}在哪里？", "a.position": "{colour}的{shape}在{loc}。",
        "q.binding_shape": "{colour}的图形是什么形状？", "a.binding_shape": "{colour}的图形是{shape}。",
        "q.binding_position": "{shape}在哪里？", "a.binding_position": "{shape}在{loc}。",
        "q.yes_no": "图中有{ref}吗？", "a.yes": "有，{loc}有一个{ref}。", "a.no": "没有，图中没有{ref}。",
        "q.label": "{shape}上写着什么？", "a.label": "{shape}上写着{label}。",
        "q.describe": "请描述{colour}的{shape}。", "a.describe": "这是{loc}的一个{np}。",
        "np": "{colour}的{size}{shape}", "np.label": "写着{label}的{colour}{size}{shape}",
        "label.letter": "“{text}”", "label.number": "“{text}”",
        "caption": "{tone}背景上有{n}个图形：{items}。", "caption.item": "{loc}是一个{np}",
        "q.graph": "请写出这张图片的场景图：先列出物体及其位置，再说明它们之间的关系。",
        "graph": "物体：{items}。关系：{relations}", "graph.item": "{np}（{pos}）",
        "rel": "{a}在{b}的{rel}。", "rel.next": "{a}和{b}相邻。", "rel.none": "只有一个物体，所以没有关系。",
        "q.atmosphere": "这张图片的整体氛围如何？",
        "atmosphere": "这张图片给人一种{mood}的感觉。{background}上有{n}个图形。{palette}",
        "palette.one": "只有{colours}一种颜色，显得很简洁。", "palette.many": "{colours}让画面显得丰富多彩，{warmth}。",
        "q.colours": "图中用了哪些颜色？", "a.colours": "图中用了{colours}。"},
}
# Pretraining-text material, parallel English / Korean.
SHAPE_FACTS = (
    ("A triangle has three sides and three corners.", "삼각형은 변이 세 개이고 꼭짓점도 세 개입니다."),
    ("A square has four sides of the same length.", "정사각형은 길이가 같은 변 네 개로 이루어져 있습니다."),
    ("A circle is round and has no corners.", "원은 둥글고 꼭짓점이 없습니다."),
    ("A star usually has five points.", "별은 보통 뾰족한 끝이 다섯 개 있습니다."),
    ("A diamond looks like a square standing on one corner.", "마름모는 한 꼭짓점으로 선 정사각형처럼 보입니다."),
    ("A heart is a shape that stands for love.", "하트는 사랑을 나타내는 모양입니다."),
    ("Triangles, squares and diamonds all have straight sides.", "삼각형, 정사각형, 마름모는 모두 곧은 변을 가지고 있습니다."),
    ("Shapes and colors are everywhere around us.", "우리 주변에는 도형과 색이 가득합니다."),
    ("Children often learn shapes by drawing them.", "아이들은 도형을 그리면서 모양을 배웁니다."),
    ("We can describe a picture by saying what is in it and where each thing is.",
     "그림은 그 안에 무엇이 있고 각각 어디에 있는지 말하여 설명할 수 있습니다."),
    ("Left and right, top and bottom help us say where things are.", "왼쪽과 오른쪽, 위와 아래는 물건의 위치를 말할 때 도움이 됩니다."),
    ("Warm colors such as red and orange feel lively.", "빨간색과 주황색 같은 따뜻한 색은 생기 있게 느껴집니다."),
    ("Cool colors such as blue and green feel calm.", "파란색과 초록색 같은 차가운 색은 차분하게 느껴집니다."),
    ("A small shape takes up less space than a large one.", "작은 도형은 큰 도형보다 공간을 적게 차지합니다."))
THINGS = (("A banana", "바나나", "yellow"), ("A strawberry", "딸기", "red"), ("A leaf", "나뭇잎", "green"),
          ("The clear sky", "맑은 하늘", "blue"), ("A grape", "포도", "purple"), ("A carrot", "당근", "orange"),
          ("A crow", "까마귀", "black"), ("Chocolate", "초콜릿", "brown"), ("A lemon", "레몬", "yellow"),
          ("A ripe tomato", "잘 익은 토마토", "red"), ("A pine tree", "소나무", "green"), ("The sea", "바다", "blue"),
          ("An eggplant", "가지", "purple"), ("A tangerine", "귤", "orange"), ("The night sky", "밤하늘", "black"),
          ("A tree trunk", "나무줄기", "brown"))
NAMES = (("Minsu", "민수"), ("Jieun", "지은"), ("Seoyeon", "서연"), ("Hajun", "하준"), ("Jiho", "지호"),
         ("Yuna", "유나"), ("Doyun", "도윤"), ("Haeun", "하은"))
ITEMS = (("apple", "사과"), ("book", "책"), ("pencil", "연필"), ("cup", "컵"), ("flower", "꽃"), ("ball", "공"),
         ("cookie", "쿠키"), ("marble", "구슬"))


class _Formatter(string.Formatter):
    """str.format whose specs carry grammar: Korean particles (`{x:을/를}`), English articles (`{x:a}`)."""

    def __init__(self, lang: str):
        super().__init__()
        self.lang = lang

    def format_field(self, value: object, format_spec: str) -> str:
        text = str(value)
        if not format_spec:
            return text
        if self.lang == "ko":
            return josa(text, format_spec)
        if self.lang == "en" and format_spec in ("a", "A"):
            article = "an" if text[:1].lower() in "aeiou" else "a"
            return f"{article.capitalize() if format_spec == 'A' else article} {text}"
        raise ValueError(f"format spec {format_spec!r} means nothing in {self.lang}")


_FORMATTERS = {lang: _Formatter(lang) for lang in LANGS}


def fill(lang: str, template: str, **fields: object) -> str:
    """`template` (a format string in `lang`) filled with `fields`, particles and articles agreeing."""
    return _FORMATTERS[lang].format(template, **fields)


def say(lang: str, key: str, **fields: object) -> str:
    """The template `key` of `lang` filled with `fields`."""
    return fill(lang, TEMPLATES[lang][key], **fields)


def join(lang: str, items: Sequence[str]) -> str:
    """A list in running text: "red, blue and green" / "빨간색, 파란색과 초록색" / "红色、蓝色和绿色"."""
    if len(items) == 1:
        return items[0]
    head, last = list(items[:-1]), items[-1]
    if lang == "en":
        return f"{', '.join(head)} and {last}"
    if lang == "ko":
        return f"{', '.join(head[:-1] + [josa(head[-1], '와/과')])} {last}"
    return f"{'、'.join(head)}和{last}"


def count_fields(lang: str, n: int, noun: str = "shape") -> dict[str, str]:
    """Template fields for a count of n things: EN `n_shapes` ("three shapes"), `be`; KO/ZH `n` (세, 三)."""
    if lang == "en":
        phrase = f"{EN_NUMBERS[n - 1]} {noun}{'s' if n > 1 else ''}"
        return {"n_shapes": phrase, "n_shapes_cap": phrase.capitalize(), "be": "is" if n == 1 else "are"}
    return {"n": native_number(n) if lang == "ko" else ZH_NUMBERS[n - 1]}


def position(lang: str, cell: int) -> str:
    """The short answer naming a grid cell: "top left", "왼쪽 위", "左上角"."""
    en, _, ko, zh = POSITIONS[cell]
    return {"en": en, "ko": ko, "zh": zh}[lang]


def locative(lang: str, cell: int) -> str:
    """A grid cell as it stands in a sentence: EN "in the top left"; KO and ZH as `position` (+ 에 / 在)."""
    return POSITIONS[cell][1] if lang == "en" else position(lang, cell)


def pick(lang: str, triple: Sequence[str]) -> str:
    """The `lang` entry of an (EN, KO, ZH) tuple."""
    return triple[LANGS.index(lang)]


SENTENCE_SEP = {"en": " ", "ko": " ", "zh": ""}
ITEM_SEP = {"en": "; ", "ko": ", ", "zh": "；"}


def object_fields(lang: str, obj: Obj) -> dict[str, str]:
    """Template fields naming `obj`: colour, shape, size, pos, loc, label (when it has one) and np."""
    words = WORDS[lang]
    fields = {"colour": words[obj.colour], "shape": words[obj.shape], "size": words[obj.size],
              "pos": position(lang, obj.cell), "loc": locative(lang, obj.cell)}
    if obj.label:
        fields["label"] = say(lang, "label.number" if obj.label.isdigit() else "label.letter", text=obj.label)
    fields["np"] = say(lang, "np.label" if obj.label else "np", **fields)
    return fields


def reference(lang: str, colour: str, shape: str) -> str:
    """An object named by colour and shape: "red circle", "빨간색 원", "红色的圆形"."""
    words = WORDS[lang]
    return f"{words[colour]}的{words[shape]}" if lang == "zh" else f"{words[colour]} {words[shape]}"


def _question_fields(question: Question, scene: Scene, lang: str) -> dict[str, str]:
    fields = object_fields(lang, question.obj) if question.obj else {}
    if question.colour:
        fields.update(colour=WORDS[lang][question.colour], shape=WORDS[lang][question.shape],
                      ref=reference(lang, question.colour, question.shape))
    return fields | count_fields(lang, len(scene.objects))


def ask(question: Question, scene: Scene, lang: str) -> str:
    """The question as a user would ask it (no short-answer suffix)."""
    return say(lang, f"q.{question.kind}", **_question_fields(question, scene, lang))


def full_answer(question: Question, scene: Scene, lang: str) -> str:
    """A full-sentence answer."""
    key = ("a.yes" if question.obj else "a.no") if question.kind == "yes_no" else f"a.{question.kind}"
    return say(lang, key, **_question_fields(question, scene, lang))


def short_answer(question: Question, scene: Scene, lang: str) -> str:
    """The gold short answer: "red" / "빨간색", "circle" / "원", "3", "top left" / "왼쪽 위", "yes" / "예", "A"."""
    kind, obj = question.kind, question.obj
    if kind == "count":
        return str(len(scene.objects))
    if kind == "yes_no":
        return YES_NO[lang][0 if obj else 1]
    if kind in ("position", "binding_position"):
        return position(lang, obj.cell)
    if kind == "label":
        return obj.label
    return WORDS[lang][obj.colour if kind == "colour" else obj.shape]


def caption(scene: Scene, lang: str) -> str:
    """Every object's size, colour, shape (and label) with its position, in reading order."""
    items = [say(lang, "caption.item", **object_fields(lang, obj)) for obj in scene.objects]
    listed = join(lang, items) if lang == "en" else ("，" if lang == "zh" else ", ").join(items)
    return say(lang, "caption", items=listed, tone=WORDS[lang][scene.tone], **count_fields(lang, len(scene.objects)))


def scene_graph_text(scene: Scene, lang: str) -> str:
    """The scene graph in words: the objects with their cells, then pairwise directions and adjacency."""
    items = [say(lang, "graph.item", **object_fields(lang, obj)) for obj in scene.objects]
    relations = []
    for i, a in enumerate(scene.objects):
        for b in scene.objects[i + 1:]:
            (ra, ca), (rb, cb) = divmod(a.cell, 3), divmod(b.cell, 3)
            refs = {"a": reference(lang, a.colour, a.shape), "b": reference(lang, b.colour, b.shape)}
            direction = ((ra > rb) - (ra < rb), (ca > cb) - (ca < cb))
            relations.append(say(lang, "rel", rel=pick(lang, RELATIVE[direction]), **refs))
            if abs(ra - rb) + abs(ca - cb) == 1:
                relations.append(say(lang, "rel.next", **refs))
    text = SENTENCE_SEP[lang].join(relations) if relations else say(lang, "rel.none")
    return say(lang, "graph", items=ITEM_SEP[lang].join(items), relations=text)


def atmosphere(scene: Scene, lang: str) -> str:
    """The overall impression: mood from the object count, the background, the palette and its warmth."""
    n, names = len(scene.objects), [WORDS[lang][obj.colour] for obj in scene.objects]
    if n == 1:
        palette = say(lang, "palette.one", colours=names[0])
    else:
        colours = {obj.colour for obj in scene.objects}
        warmth = "mixed" if colours & WARM and colours & COOL else "warm" if colours & WARM else "cool"
        listed = join(lang, names)
        palette = say(lang, "palette.many", colours=listed, colours_cap=listed[:1].upper() + listed[1:],
                      warmth=pick(lang, WARMTH[warmth]))
    background = fill(lang, pick(lang, TEXTURES[scene.texture]), tone=WORDS[lang][scene.tone])
    return say(lang, "atmosphere", mood=pick(lang, MOODS[min(n, len(MOODS)) - 1]), background=background,
               palette=palette, **count_fields(lang, n))


def colours_used(scene: Scene, lang: str) -> str:
    """Which colours the image uses, in reading order."""
    return say(lang, "a.colours", colours=join(lang, [WORDS[lang][obj.colour] for obj in scene.objects]))
