"""`xllava eval score`: score a LLaVA answer JSONL against a benchmark's gold; the last stdout line is one JSON
object of metrics (also written to `--out`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xllava_jax.eval.answers import ScoreError
from xllava_jax.eval.judging import EXIT_SOME_FAILED, EXIT_STATUS_HELP, add_endpoint_options
from xllava_jax.eval.scorers import BENCHMARKS, JUDGED, score
from xllava_jax.eval.scorers.common import ScoreRequest

EXAMPLES = """examples:
  xllava eval score --benchmark vqav2 --answers runs/vqav2/answers.jsonl \\
      --annotations v2_mscoco_val2014_annotations.json --questions vqav2_val_subset.jsonl --out scores/vqav2.json
  xllava eval score --benchmark gqa --answers runs/gqa/answers.jsonl --questions testdev_balanced_questions.json
  xllava eval score --benchmark pope --answers runs/pope/answers.jsonl \\
      --annotations coco_pope_random.json coco_pope_popular.json coco_pope_adversarial.json
  xllava eval score --benchmark pope --answers llava_answers.jsonl --questions llava_pope_test.jsonl \\
      --annotations coco/coco_pope_*.json
  xllava eval score --benchmark koviz --answers runs/koviz/answers.jsonl --rules strict --out scores/koviz.json
  xllava eval score --benchmark kmmbench --answers runs/kmmbench/answers.jsonl
  xllava eval score --benchmark synth_vqa --answers runs/synth/answers.jsonl \\
      --questions data/synth/vqa_heldout_ko.jsonl
  xllava eval score --benchmark llava_bench --answers runs/llava_bench/answers.jsonl --questions questions.jsonl \\
      --annotations answers_gpt4.jsonl --context context.jsonl --api-base https://api.openai.com/v1
"""

DESCRIPTION = """Score LLaVA-format answers (question_id, text, model_id, + the keys copied from the question line).
Gold by benchmark:
  vqav2, kvqa        --annotations VQA annotations JSON, or each answer line's `answers` (10 strings);
                     --questions limits the questions scored (VQAv2 questions JSON or LLaVA question JSONL)
  gqa                --questions GQA questions JSON (or the keys on the answer lines)
  pope               --annotations coco_pope_<split>.json files (or each answer line's `label`, `category`);
                     --questions LLaVA's llava_pope_test.jsonl gives each answer's split (`category`), as LLaVA does
  bokvqa_ko, bokvqa_en, koviz, koliv
                     each answer line's `label` (or --questions JSONL); --rules paper (default) | strict
  mmbench, kmmbench, kseed, kmmstar, kdtcbench
                     each answer line's `answer`, `options`, `option_char`, `round_id`, `category`
  synth_vqa          --questions vqa_heldout_<lang>.jsonl (or the keys on the answer lines)
  llava_bench, kllava_w
                     judged by an LLM: --questions questions.jsonl, --annotations reference answers JSONL,
                     --api-base, --judge-model, optional --context and --image-root
Questions without an answer score 0 and are counted in `missing`; nothing is dropped silently.
llava_bench, kllava_w """ + EXIT_STATUS_HELP


def _expand(path: str) -> str:
    return str(Path(path).expanduser())


def add_score_parser(subparsers) -> argparse.ArgumentParser:
    """Add `score` to the `xllava eval` subcommands."""
    p = subparsers.add_parser("score", help="score an answer JSONL against a benchmark's gold",
                              description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS, metavar="NAME",
                   help="one of: " + ", ".join(BENCHMARKS))
    p.add_argument("--answers", required=True, metavar="FILE",
                   help="LLaVA answer JSONL (`xllava eval run` writes answers.jsonl)")
    p.add_argument("--questions", metavar="FILE",
                   help="question file (VQAv2 / GQA questions JSON or LLaVA question JSONL)")
    p.add_argument("--annotations", nargs="+", action="extend", default=[], metavar="FILE",
                   help="annotation file(s): VQA annotations JSON, POPE split files, LLaVA-Bench reference answers")
    p.add_argument("--rules", choices=("paper", "strict"),
                   help="Korean sets and bokvqa_en: the paper's rules (default) or strict ones")
    p.add_argument("--out", metavar="FILE.json", help="also write the metrics JSON to this file")
    judge = p.add_argument_group("LLM judge (llava_bench, kllava_w)")
    judge.add_argument("--api-base", help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    judge.add_argument("--judge-model", default="gpt-4-0613", help="judge model (default: %(default)s)")
    judge.add_argument("--api-key-env", default="OPENAI_API_KEY",
                       help="environment variable holding the API key (default: %(default)s)")
    judge.add_argument("--cache-dir", type=_expand, default="~/.cache/xllava/judge",
                       help="judge reply cache (default: ~/.cache/xllava/judge)")
    judge.add_argument("--image-root", help="directory of the benchmark images (sent to the judge when given)")
    judge.add_argument("--context", help="LLaVA-Bench context.jsonl (image captions for the judge)")
    judge.add_argument("--concurrency", type=int, default=4, help="parallel judge requests (default: %(default)s)")
    add_endpoint_options(judge)
    p.set_defaults(run=run_score)
    return p


def _judge(args: argparse.Namespace) -> dict:
    if args.rules is not None:
        raise ScoreError(f"--rules does not apply to {args.benchmark}")
    from xllava_jax.eval.judge import score_llava_bench

    return score_llava_bench(args)


def run_score(args: argparse.Namespace) -> int:
    """Score, print the metrics as one JSON line, write them to `--out` when given; the exit status is
    EXIT_SOME_FAILED when some judgements failed (LLM-judged benchmarks), else 0."""
    if args.benchmark in JUDGED:
        metrics = _judge(args)
    else:
        metrics = score(ScoreRequest(args.benchmark, Path(args.answers),
                                     Path(args.questions) if args.questions else None,
                                     tuple(Path(a) for a in args.annotations), args.rules))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(metrics, ensure_ascii=False))
    return EXIT_SOME_FAILED if metrics.get("failed") else 0
