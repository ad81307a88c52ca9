"""What Korean vocabulary expansion buys: tokens per Hangul character before and after, on held-out text.

Expands `--base` (a LLaMA-family SentencePiece model) with a Korean BPE model of `--num-new` pieces
trained on a train split of the given Korean text, then encodes the held-out split with both tokenizers.
Text comes from `--korean-dir` (HTML help pages or .txt files, searched recursively; HTML is reduced to
its prose lines) and/or `--text` files. The split is by document, and held-out lines that also occur in
the train split are dropped. Downloads nothing. The last line printed is one JSON object.

  python benchmarks/vocab_bench.py --base /tmp/mc/mistral_common/data/tokenizer.model.v1 \\
      --korean-dir /tmp/lohelp/usr/share/libreoffice/help/ko --num-new 7000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import sentencepiece as spm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from xllava_jax.tokenizer.expand import expand_tokenizer, model_path
from xllava_jax.tokenizer.scripts import script_of
from xllava_jax.tokenizer.stats import count_tokens

BLOCK_TAGS = {"p", "div", "li", "td", "th", "tr", "br", "h1", "h2", "h3", "h4", "h5", "h6", "title", "dt", "dd",
              "pre", "table", "ul", "ol", "section", "article", "header", "footer", "nav", "blockquote"}
SKIP_TAGS = {"script", "style", "noscript", "svg"}
TEXT_SUFFIXES = {".html", ".htm", ".xhtml", ".xhp", ".txt"}


class ProseExtractor(HTMLParser):
    """Text of an HTML page, one line per block element, without scripts and styles."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in SKIP_TAGS:
            self.skipping += 1
        elif tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in SKIP_TAGS:
            self.skipping = max(0, self.skipping - 1)
        elif tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data.replace("\n", " "))

    def lines(self) -> list[str]:
        return [" ".join(line.split()) for line in "".join(self.parts).splitlines()]


def is_prose(line: str, min_chars: int = 12, min_hangul: float = 0.3) -> bool:
    """A line worth measuring: long enough, and mostly Hangul among its letters."""
    letters = [c for c in line if c.isalpha()]
    return len(line) >= min_chars and bool(letters) and \
        sum(script_of(c) == "hangul" for c in letters) >= min_hangul * len(letters)


def document_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".txt":
        return [" ".join(line.split()) for line in text.splitlines()]
    parser = ProseExtractor()
    parser.feed(text)
    return parser.lines()


def collect_documents(korean_dir: str | None, texts: list[str]) -> list[list[str]]:
    paths = sorted(p for p in Path(korean_dir).rglob("*") if p.suffix.lower() in TEXT_SUFFIXES) if korean_dir else []
    paths += [Path(t) for t in texts]
    documents = [[line for line in document_lines(p) if is_prose(line)] for p in paths]
    return [d for d in documents if d]


def split_documents(documents: list[list[str]], held_out: float, seed: int) -> tuple[list[str], list[str]]:
    """Train and held-out lines, each without repeats: whole documents go to one side, and held-out lines
    that also occur in the train split are dropped."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(len(order) * held_out))
    train = list(dict.fromkeys(line for i in order[cut:] for line in documents[i]))
    seen = set(train)
    return train, list(dict.fromkeys(line for i in order[:cut] for line in documents[i] if line not in seen))


def hangul_rate(processor: spm.SentencePieceProcessor, lines: list[str]) -> tuple[float, float]:
    counts = count_tokens(processor, lines)
    hangul = counts["scripts"]["hangul"]
    return hangul["tokens"] / hangul["chars"], counts["tokens"] / counts["chars"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base SentencePiece model (or a directory with tokenizer.model)")
    parser.add_argument("--korean-dir", help="directory of Korean HTML or .txt files (searched recursively)")
    parser.add_argument("--text", nargs="*", default=[], help="more Korean text files")
    parser.add_argument("--num-new", type=int, default=7000, help="new pieces to add (default 7000)")
    parser.add_argument("--held-out", type=float, default=0.1, help="share of documents held out (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document split (default 0)")
    parser.add_argument("--workdir", help="where to keep the corpus split and the expanded tokenizer (default: temp)")
    args = parser.parse_args()
    if not args.korean_dir and not args.text:
        parser.error("give --korean-dir and/or --text")

    documents = collect_documents(args.korean_dir, args.text)
    train, test = split_documents(documents, args.held_out, args.seed)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vocab_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    (workdir / "held_out.txt").write_text("\n".join(test) + "\n", encoding="utf-8")
    size = sum(len(line.encode("utf-8")) + 1 for line in train + test)
    print(f"{len(documents)} documents, {size / 1e6:.2f} MB of prose lines: {len(train)} train lines, "
          f"{len(test)} held-out lines")

    start = time.perf_counter()
    record = expand_tokenizer(args.base, workdir / "expanded", train_corpus=[workdir / "train.txt"],
                              num_new=args.num_new, progress=True)
    seconds = time.perf_counter() - start
    base = spm.SentencePieceProcessor(model_file=str(model_path(args.base)))
    expanded = spm.SentencePieceProcessor(model_file=str(workdir / "expanded" / "tokenizer.model"))
    base_hangul, base_all = hangul_rate(base, test)
    new_hangul, new_all = hangul_rate(expanded, test)
    reduction = 1 - new_hangul / base_hangul
    print(f"expanded {record['base_size']} + {record['num_new']} = {record['new_size']} pieces in {seconds:.1f} s "
          f"(filtered: {record['filtered']})")
    print(f"held-out tokens per Hangul character: base {base_hangul:.3f}, expanded {new_hangul:.3f} "
          f"({100 * reduction:.1f}% fewer); all characters: {base_all:.3f} -> {new_all:.3f}")
    print(json.dumps({"base": str(args.base), "base_size": record["base_size"], "num_new": record["num_new"],
                      "new_size": record["new_size"], "train_lines": len(train), "held_out_lines": len(test),
                      "base_tokens_per_hangul_char": round(base_hangul, 4),
                      "expanded_tokens_per_hangul_char": round(new_hangul, 4),
                      "hangul_reduction": round(reduction, 4), "base_tokens_per_char": round(base_all, 4),
                      "expanded_tokens_per_char": round(new_all, 4), "expand_seconds": round(seconds, 2)}))


if __name__ == "__main__":
    main()
