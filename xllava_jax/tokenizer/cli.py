"""The `xllava vocab` command: expand, resize, stats.

`add_vocab_parser(subparsers)` adds the command to the `xllava` parser, with `run_vocab` as each subcommand's
`run`; `run_vocab(args)` runs it and raises `TokenizerError` (a UserError) with one clear line on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from xllava_jax.errors import SettingFlags
from xllava_jax.tokenizer.expand import FILTERS, check_out_dir, expand_tokenizer, load_proto
from xllava_jax.tokenizer.runtime import TokenizerError
from xllava_jax.tokenizer.scripts import SCRIPTS

INIT_CHOICES = ("subword_mean", "mean", "normal")
VOCAB_EXAMPLES = """examples:
  xllava vocab expand --base Llama-2-13b-hf --out tok/ko --merge-model kobert/spiece.model
  xllava vocab expand --base Llama-2-13b-hf/tokenizer.model --out tok/ko --train-corpus ko1.txt ko2.txt --num-new 7000
  xllava vocab expand --base ckpt/llama13b --out tok/ko --merge-vocab pieces.txt \\
      --checkpoint ckpt/llama13b --checkpoint-out ckpt/llama13b-ko
  xllava vocab resize --checkpoint ckpt/llama13b --tokenizer tok/ko --out ckpt/llama13b-ko
  xllava vocab stats --tokenizer Llama-2-13b-hf tok/ko --text ko.txt en.txt
"""


# The settings of expand_tokenizer, expand_checkpoint and compute_stats (and what they call) that their messages
# name. `vocab expand` reads the expanded tokenizer back from its --out.
_RESIZE_FLAGS = {"checkpoint": "--checkpoint", "method": "--init", "pad_to_multiple_of": "--pad-to-multiple-of"}
EXPAND_FLAGS = SettingFlags({"base": "--base", "out": "--out", "merge_model": "--merge-model",
                             "merge_vocab": "--merge-vocab", "train_corpus": "--train-corpus", "num_new": "--num-new",
                             "script": "--script", "syllable_coverage=False": "--no-syllable-coverage",
                             "checkpoint_out": "--checkpoint-out", "tokenizer": "--out", **_RESIZE_FLAGS})
RESIZE_FLAGS = SettingFlags({"tokenizer": "--tokenizer", "out": "--out", **_RESIZE_FLAGS})
STATS_FLAGS = SettingFlags({"tokenizer": "--tokenizer", "text": "--text"})


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_resize_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", default="subword_mean", choices=INIT_CHOICES,
                        help="new embedding and lm_head rows: subword_mean (mean of the rows of the base pieces "
                             "each new token splits into), mean (of all old rows) or normal (random with the old "
                             "rows' std); default subword_mean")
    parser.add_argument("--pad-to-multiple-of", type=_positive_int, metavar="N",
                        help="pad the vocabulary rows up to a multiple of N (default: the checkpoint's setting)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --init normal (default 0)")


def add_vocab_parser(subparsers) -> None:
    """Add `vocab` (with `expand`, `resize`, `stats`) to the `xllava` subparsers."""
    vocab = subparsers.add_parser("vocab", help="expand a tokenizer's vocabulary, measure compression",
                                  description="Vocabulary tools: add Korean (or other) pieces to a LLaMA-family "
                                              "SentencePiece model, grow a checkpoint to match, compare tokenizers.",
                                  epilog=VOCAB_EXAMPLES, formatter_class=_formatter)
    steps = vocab.add_subparsers(dest="vocab_command", required=True)

    expand = steps.add_parser(
        "expand", help="append new pieces to a SentencePiece BPE model", epilog=VOCAB_EXAMPLES,
        formatter_class=_formatter,
        description="Append new pieces to a LLaMA-family SentencePiece BPE model (base ids never move) and write "
                    "OUT/tokenizer.model, the Hugging Face tokenizer files and OUT/expansion.json (sizes, each new "
                    "id with its piece and its ids under the base tokenizer, filter counts). Pieces already in the "
                    "base, byte, control, empty and (unless --script any) pieces without the target script are "
                    "dropped and counted. The 2,350 KS X 1001 Hangul syllables that the base lacks are added too "
                    "(within --num-new), so no everyday Korean syllable falls back to bytes: first with "
                    "--train-corpus, after the merged pieces with --merge-model / --merge-vocab, so that these "
                    "keep the ids of a plain append (X-LLaVA: 32,000 + 7,478 KoBERT pieces in their order).")
    expand.add_argument("--base", required=True, metavar="MODEL",
                        help="base SentencePiece model, or a directory holding tokenizer.model (its "
                             "tokenizer_config.json settings are carried over)")
    expand.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    source = expand.add_mutually_exclusive_group(required=True)
    source.add_argument("--merge-model", metavar="MODEL",
                        help="take the pieces of another SentencePiece model (e.g. KoBERT's), best first")
    source.add_argument("--merge-vocab", metavar="FILE",
                        help="take pieces from a list, one per line, best first (first tab-separated field, so "
                             "sentencepiece .vocab files work; a space is read as the word-start mark)")
    source.add_argument("--train-corpus", nargs="+", metavar="FILE",
                        help="train a BPE model on these UTF-8 text files and take its pieces (needs --num-new)")
    expand.add_argument("--num-new", type=int, metavar="N",
                        help="number of pieces to add (required with --train-corpus); with a merge source, at most N")
    expand.add_argument("--script", default="hangul", choices=(*SCRIPTS, "any"),
                        help="keep only pieces holding a character of this script; any: no script filter "
                             "(default hangul)")
    expand.add_argument("--no-syllable-coverage", dest="syllable_coverage", action="store_false",
                        help="do not add the KS X 1001 Hangul syllables the base lacks (added by default with "
                             "--script hangul or any: first with --train-corpus, else after the merged pieces)")
    expand.add_argument("--checkpoint", metavar="CKPT",
                        help="also grow this checkpoint's embeddings and lm_head (needs --checkpoint-out)")
    expand.add_argument("--checkpoint-out", metavar="DIR", help="where to write the expanded checkpoint")
    _add_resize_options(expand)
    expand.set_defaults(run=run_vocab, flags=EXPAND_FLAGS)

    resize = steps.add_parser(
        "resize", help="grow a checkpoint's vocabulary to an expanded tokenizer", epilog=VOCAB_EXAMPLES,
        formatter_class=_formatter,
        description="Grow a checkpoint's input embeddings and lm_head to the vocabulary of a tokenizer written by "
                    "`xllava vocab expand` (old rows kept bit for bit) and write a new checkpoint that carries "
                    "the expanded tokenizer files.")
    resize.add_argument("--checkpoint", required=True, metavar="CKPT", help="our checkpoint directory")
    resize.add_argument("--tokenizer", required=True, metavar="DIR",
                        help="the --out directory of `xllava vocab expand` (tokenizer.model + expansion.json)")
    resize.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory (new or empty)")
    _add_resize_options(resize)
    resize.set_defaults(run=run_vocab, flags=RESIZE_FLAGS)

    stats = steps.add_parser(
        "stats", help="compare tokenizers on text files", epilog=VOCAB_EXAMPLES, formatter_class=_formatter,
        description="For each tokenizer and text file: tokens per character, tokens per whitespace word, share of "
                    "byte-fallback tokens and unknown tokens, overall and per script (Hangul, Han, Latin).")
    stats.add_argument("--tokenizer", required=True, nargs="+", metavar="PATH",
                       help="SentencePiece model files or directories holding tokenizer.model")
    stats.add_argument("--text", required=True, nargs="+", metavar="FILE", help="UTF-8 text files")
    stats.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    stats.set_defaults(run=run_vocab, flags=STATS_FLAGS)


def _print_expansion(record: dict, out: str) -> None:
    print(f"base {record['base_size']} + {record['num_new']} new = {record['new_size']} pieces "
          f"(source: {record['source']['kind'].replace('_', '-')})")
    print("filtered: " + ", ".join(f"{name} {record['filtered'][name]}" for name in FILTERS))
    syllables = record["ksx1001_syllables"]
    counts = (f"{syllables['in_base']:,} in the base + {syllables['added']:,} added = {syllables['after']:,}"
              if syllables["ensured"] else f"{syllables['in_base']:,} in the base, {syllables['after']:,} after")
    why = "--no-syllable-coverage" if record["script"] in ("hangul", "any") else f"--script {record['script']}"
    print(f"{counts} of the {syllables['total']:,} KS X 1001 Hangul syllables"
          + ("" if syllables["ensured"] else f" ({why})"))
    for warning in record["warnings"]:
        print(f"xllava: warning: {warning}", file=sys.stderr)
    print(f"wrote {out}")


def run_vocab(args: argparse.Namespace) -> None:
    """Run `xllava vocab ...`; raises TokenizerError (or CheckpointError) on bad input."""
    if args.vocab_command == "stats":
        from xllava_jax.tokenizer.stats import compute_stats, format_table

        result = compute_stats(args.tokenizer, args.text, progress=True)
        print(json.dumps(result, ensure_ascii=False) if args.json else format_table(result))
        return
    if args.vocab_command == "resize":
        from xllava_jax.models.resize import expand_checkpoint

        out = expand_checkpoint(args.checkpoint, args.tokenizer, args.out, method=args.init,
                                pad_to_multiple_of=args.pad_to_multiple_of, seed=args.seed, progress=True)
        print(f"wrote {out}")
        return
    if bool(args.checkpoint) != bool(args.checkpoint_out):
        raise TokenizerError("--checkpoint and --checkpoint-out go together")
    if args.checkpoint:  # fail before the expansion, not after it
        from xllava_jax.models.resize import check_checkpoint

        check_out_dir(args.checkpoint_out, "checkpoint_out")
        check_checkpoint(args.checkpoint, len(load_proto(args.base).pieces))
    record = expand_tokenizer(args.base, args.out, merge_model=args.merge_model, merge_vocab=args.merge_vocab,
                              train_corpus=args.train_corpus or (), num_new=args.num_new, script=args.script,
                              syllable_coverage=args.syllable_coverage, progress=True)
    _print_expansion(record, args.out)
    if args.checkpoint:
        from xllava_jax.models.resize import expand_checkpoint

        out = expand_checkpoint(args.checkpoint, args.out, args.checkpoint_out, method=args.init,
                                pad_to_multiple_of=args.pad_to_multiple_of, seed=args.seed,
                                out_setting="checkpoint_out", progress=True)
        print(f"wrote {out}")
