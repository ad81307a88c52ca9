"""Generated text and small SentencePiece models for the vocabulary tests.

Korean sentences are built from nouns, particles that agree with the final consonant (이/가, 을/를,
은/는, 와/과, 으로/로) and conjugated verbs, with a Zipf-like word distribution, so a BPE model trained
on them learns whole words and word + particle pieces as it would on real prose.
"""

from __future__ import annotations

import io
import itertools
import random

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb


def words(text: str) -> list[str]:
    return text.split()


HANGUL_BASE = 0xAC00
RIEUL, BIEUP = 8, 17  # final-consonant indices of ㄹ and ㅂ

REAL_NOUNS = words(
    "사람 학교 회사 문서 파일 사용자 도구 설정 언어 나라 시간 도시 친구 가족 음식 물 책 영화 음악 그림 "
    "컴퓨터 프로그램 데이터 정보 문제 방법 결과 이름 주소 전화 메일 사진 화면 창 메뉴 단추 목록 표 "
    "글꼴 문단 페이지 서식 스타일 셀 행 열 차트 슬라이드 도형 텍스트 필드 명령 옵션 대화상자 "
    "아침 저녁 오늘 내일 어제 주말 여름 겨울 바다 산 강 하늘 날씨 길 집 방 문 의자 책상 "
    "선생님 학생 의사 경찰 기자 가수 배우 작가 아이 어른 부모 형 누나 동생 마음 생각 이야기 질문 "
    "대답 계획 약속 여행 공부 운동 일 회의 수업 시험 연구 개발 경제 정치 사회 문화 역사 과학 기술"
)
COMMON_SYLLABLES = words(
    "가 나 다 라 마 바 사 아 자 차 카 타 파 하 고 노 도 로 모 보 소 오 조 초 코 토 포 호 구 누 두 "
    "루 무 부 수 우 주 추 쿠 투 푸 후 기 니 디 리 미 비 시 이 지 치 키 티 피 히 개 내 대 래 매 배 "
    "새 애 재 채 해 거 너 더 러 머 버 서 어 저 처 허 경 정 성 상 장 방 강 동 중 전 진 신 인 민 연 "
    "원 선 현 한 관 국 문 물 실 일 월 학 력 록 석 식 적 직 용 영 명 생 행 향 면 변 편 권 운 윤 훈"
)
VERB_STEMS = words("가 오 보 먹 읽 쓰 만들 찾 열 닫 받 놓 살 알 듣 걷 앉 웃 울 입 주 배우 기다리 만나")
HADA_STEMS = words("사용 설정 변경 저장 선택 입력 확인 삭제 추가 표시 실행 생각 공부 운동 준비 시작 "
                   "정리 연결 복사 인쇄 검색 설명 소개 이해 사랑 출발 도착 연습 요청 계산")
PAST_STEMS = {"가": "갔", "오": "왔", "보": "봤", "쓰": "썼", "주": "줬", "배우": "배웠", "기다리": "기다렸",
              "만나": "만났", "듣": "들었", "걷": "걸었"}
ADVERBS = words("아주 매우 다시 먼저 자주 항상 가끔 빨리 천천히 함께 모두 이미 아직 바로 잘 더")
LATIN_WORDS = words("PDF HTML CSV LibreOffice Writer Calc Impress URL Enter Tab Ctrl Shift F1 OK")

ENGLISH_WORDS = words(
    "the of and to in is was for on that with as by at from this be are it an or have not which one had "
    "time people year way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education "
    "say make go know take see come think look want give use find tell ask feel try leave call keep provide "
    "hold turn follow begin bring like write stand hear let mean set meet run pay sit speak lie lead read "
    "grow lose fall send build understand draw break spend cut rise drive buy wear choose seek throw catch "
    "good new first last long great little own other old right big high different small large next early "
    "young important few public bad same able quickly slowly carefully really often always never simply "
    "tokenizer vocabulary sentence paragraph language model training evaluation dataset benchmark figure "
    "table chapter section appendix method approach analysis experiment measurement accuracy baseline"
)
NAMES = words("Alice Bob Carol David Emma Frank Grace Henry Seoul London Paris Monday Friday January July")
CHINESE_CHARS = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后能"


def syllable(initial: int, medial: int, final: int = 0) -> str:
    return chr(HANGUL_BASE + (initial * 21 + medial) * 28 + final)


def final_of(word: str) -> int:
    """The final-consonant index of the last syllable (0: none)."""
    code = ord(word[-1]) - HANGUL_BASE
    return code % 28 if 0 <= code < 11172 else 0


def with_final(word: str, final: int) -> str:
    code = ord(word[-1]) - HANGUL_BASE
    return word[:-1] + chr(HANGUL_BASE + code - code % 28 + final)


def particle(noun: str, kind: str) -> str:
    final = final_of(noun)
    pairs = {"topic": ("은", "는"), "subject": ("이", "가"), "object": ("을", "를"), "with": ("과", "와")}
    if kind in pairs:
        return noun + pairs[kind][0 if final else 1]
    if kind == "by":
        return noun + ("으로" if final and final != RIEUL else "로")
    return noun + kind


def conjugate(stem: str, form: str) -> str:
    final = final_of(stem)
    if stem in HADA_STEMS:
        return stem + {"formal": "합니다", "past": "했습니다", "and": "하고", "if": "하면", "rel": "하는",
                       "want": "하고 싶습니다", "so": "해서"}[form]
    if form == "formal":
        if final == RIEUL:
            return with_final(stem, BIEUP) + "니다"
        return stem + "습니다" if final else with_final(stem, BIEUP) + "니다"
    if form == "past":
        if stem in PAST_STEMS:
            return PAST_STEMS[stem] + "습니다"
        bright = (ord(stem[-1]) - HANGUL_BASE) // 28 % 21 in (0, 8)  # ㅏ, ㅗ
        return stem + ("았습니다" if bright else "었습니다")
    if form == "if":
        return stem + ("으면" if final and final != RIEUL else "면")
    if form == "rel":
        return (with_final(stem, 0) if final == RIEUL else stem) + "는"
    if form == "so":
        return stem + "어서"
    return stem + {"and": "고", "want": "고 싶습니다"}[form]


def korean_lexicon(num_nouns: int = 2500, seed: int = 0) -> list[str]:
    """Real nouns followed by made-up ones of two or three common syllables (fixed per seed)."""
    rng = random.Random(seed)
    nouns, seen = list(REAL_NOUNS), set(REAL_NOUNS)
    while len(nouns) < num_nouns:
        word = "".join(rng.choice(COMMON_SYLLABLES) for _ in range(rng.choice((2, 2, 3))))
        if word not in seen:
            seen.add(word)
            nouns.append(word)
    return nouns


def korean_sentences(n: int, seed: int, lexicon: list[str] | None = None) -> list[str]:
    """`n` Korean sentences (with a few Latin words and numbers), Zipf-distributed nouns."""
    rng = random.Random(seed)
    nouns = lexicon or korean_lexicon()
    cum_weights = list(itertools.accumulate(1.0 / (rank + 10) for rank in range(len(nouns))))
    stems = VERB_STEMS + HADA_STEMS

    def noun() -> str:
        if rng.random() < 0.04:
            return rng.choice(LATIN_WORDS)
        return rng.choices(nouns, cum_weights=cum_weights)[0]

    def verb(form: str) -> str:
        return conjugate(rng.choice(stems), form)

    out = []
    for _ in range(n):
        pattern = rng.randrange(6)
        if pattern == 0:
            words = [particle(noun(), "topic"), particle(noun(), "object"), verb(rng.choice(("formal", "past")))]
        elif pattern == 1:
            words = [particle(noun(), "subject"), particle(noun(), "에서"), particle(noun(), "object"), verb("past")]
        elif pattern == 2:
            words = [particle(noun(), "의"), particle(noun(), "topic"), rng.choice(ADVERBS), verb("formal")]
        elif pattern == 3:
            words = [particle(noun(), "with"), particle(noun(), "object"), particle(noun(), "by"), verb("and"),
                     particle(noun(), "object"), verb("formal")]
        elif pattern == 4:
            words = [particle(noun(), "object"), verb("if"), verb("rel"), particle(noun(), "subject"),
                     f"{rng.randrange(1, 100)}개", "있습니다"]
        else:
            words = [rng.choice(ADVERBS), particle(noun(), "에게"), particle(noun(), "도"), verb("want")]
        end = rng.choice((".", ".", ".", "?", "!"))
        out.append(" ".join(words) + end)
    return out


def english_lexicon(num_words: int = 4000, seed: int = 0) -> list[str]:
    """Common English words followed by made-up ones (a long tail that fills a BPE vocabulary)."""
    rng = random.Random(seed)
    onsets = words("b c d f g h l m n p r s t v w br cl dr fl gr pl st tr")
    vowels, codas = words("a e i o u ea ou"), words("n r s t l m nd st ng ck")
    lexicon, seen = list(ENGLISH_WORDS), set(ENGLISH_WORDS)
    while len(lexicon) < num_words:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.choice((1, 2, 2, 3))))
        word += rng.choice(codas) + rng.choice(("", "", "s", "ed", "ing", "er", "ly", "tion"))
        if word not in seen:
            seen.add(word)
            lexicon.append(word)
    return lexicon


def english_sentences(n: int, seed: int) -> list[str]:
    """`n` varied English lines: capitals, punctuation, digits, names, quotes and contractions."""
    rng = random.Random(seed)
    lexicon = english_lexicon()
    cum_weights = list(itertools.accumulate(1.0 / (rank + 5) for rank in range(len(lexicon))))
    out = []
    for _ in range(n):
        words = rng.choices(lexicon, cum_weights=cum_weights, k=rng.randrange(5, 16))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), rng.choice(NAMES))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randrange(0, 100000)))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), rng.choice(("don't", "it's", "we'll", "(see", "e.g.", "3.14")))
        line = " ".join(words)
        line = line[0].upper() + line[1:] + rng.choice((".", ".", "?", "!", ";", ":"))
        if rng.random() < 0.1:
            line = f'"{line}" -- {rng.choice(NAMES)}, {rng.randrange(1900, 2030)}'
        out.append(line)
    return out


def chinese_sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(CHINESE_CHARS, k=rng.randrange(6, 20))) + "。" for _ in range(n)]


def train_model(lines: list[str], vocab_size: int, **options) -> bytes:
    """A serialized SentencePiece model trained on `lines`: LLaMA-2 style (BPE, byte fallback, digits
    split, identity normaliser, whitespace kept) unless `options` say otherwise."""
    settings = {"model_type": "bpe", "vocab_size": vocab_size, "byte_fallback": True, "split_digits": True,
                "normalization_rule_name": "identity", "remove_extra_whitespaces": False,
                "allow_whitespace_only_pieces": True, "character_coverage": 0.9995, "num_threads": 2,
                "max_sentence_length": 100000, "minloglevel": 2}
    settings.update(options)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer, **settings)
    return buffer.getvalue()


def indented_lines(n: int, seed: int) -> list[str]:
    """Code-like lines: indentation and runs of spaces, so the model learns whitespace-only pieces."""
    rng = random.Random(seed)
    return [" " * rng.choice((2, 4, 4, 8, 12)) + line.replace(" ", " " * rng.choice((1, 1, 2, 4)), 2)
            for line in english_sentences(n, seed)]


def base_corpus(seed: int = 0) -> list[str]:
    """English-heavy text with a little Korean and Chinese, like a LLaMA pretraining mix."""
    return (english_sentences(8000, seed) + indented_lines(800, seed + 3) + korean_sentences(40, seed + 1)
            + chinese_sentences(40, seed + 2))


def llama_base(vocab_size: int, seed: int = 0) -> bytes:
    """A LLaMA-2-like base: trained on `base_corpus`, whitespace-only pieces scored -1e9 as in LLaMA-2's
    and Mistral's tokenizer.model (so sentencepiece merges them last)."""
    proto = pb.ModelProto()
    proto.ParseFromString(train_model(base_corpus(seed), vocab_size))
    for piece in proto.pieces:
        if piece.type == pb.ModelProto.SentencePiece.NORMAL and set(piece.piece) == {"\u2581"}:
            piece.score = -1e9
    return proto.SerializeToString()
