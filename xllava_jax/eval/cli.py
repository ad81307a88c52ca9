"""`xllava eval run|score|preference|report|perplexity`: the subcommand parsers and the glue from their flags to
the library (`runner.py`, `scorers/` and `judge.py`, `preference.py`, `report.py`, `perplexity.py`). Each
parser sets `run=` (what `xllava_jax.cli.main` calls with the parsed arguments) and `flags=` (how the command
spells the settings library messages name in backticks)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xllava_jax.data.conversation import MODES, TEMPLATES
from xllava_jax.errors import SettingFlags, UserError
from xllava_jax.eval.answers import ScoreError
from xllava_jax.eval.judging import DEFAULT_CACHE_DIR, EXIT_SOME_FAILED, EXIT_STATUS_HELP, JudgeSettings
from xllava_jax.eval.questions import BENCHMARKS as RUN_BENCHMARKS
from xllava_jax.eval.scorers import BENCHMARKS, JUDGED, score
from xllava_jax.eval.scorers.common import ScoreRequest
from xllava_jax.infer.engine import MODE_HELP, TEMPLATE_HELP

# The judge settings (`JudgeSettings`, `run_parallel`) as the LLM-judged commands spell them.
JUDGE_FLAGS = {"api_base": "--api-base", "timeout": "--timeout", "max_retries": "--max-retries",
               "backoff": "--backoff", "concurrency": "--concurrency"}
RUN_FLAGS = SettingFlags({"num_devices": "--num-devices", "batch_size": "--batch-size",
                          "max_new_tokens": "--max-new-tokens", "limit": "--limit"})
SCORE_FLAGS = SettingFlags({**JUDGE_FLAGS, "benchmark": "--benchmark", "questions": "--questions",
                            "annotations": "--annotations", "rules": "--rules", "context": "--context",
                            "image_root": "--image-root"})
PREFERENCE_FLAGS = SettingFlags({**JUDGE_FLAGS, "truncate_words": "--truncate-words"})
REPORT_FLAGS = SettingFlags({"models": "--model", "paths": "--scores"})
PERPLEXITY_FLAGS = SettingFlags({"seq_len": "--seq-len", "batch_size": "--batch-size"})


def add_eval_parser(subparsers) -> None:
    """Add `eval` and its subcommands to the `xllava` subcommands."""
    p = subparsers.add_parser("eval", help="evaluate: generate answers, score them, judge pairs, report",
                              description="Evaluation binaries of the X-LLaVA recipe.")
    steps = p.add_subparsers(dest="eval_command", required=True)
    add_preference_parser(steps)
    add_run_parser(steps)
    add_perplexity_parser(steps)
    add_score_parser(steps)
    add_report_parser(steps)


# ---------------------------------------------------------------------------------------------- LLM judge
def add_endpoint_options(group: argparse._ActionsContainer) -> None:
    """The judge request flags every LLM-judged command takes: `--timeout`, `--max-retries`, `--backoff`."""
    group.add_argument("--timeout", type=float, default=60.0, help="seconds per judge request attempt (default 60)")
    group.add_argument("--max-retries", type=int, default=6,
                       help="retries of a judge request on 429, 5xx, malformed replies and timeouts (default 6)")
    group.add_argument("--backoff", type=float, default=1.0,
                       help="first retry delay in seconds, doubled per retry; 429 Retry-After wins (default 1)")


def judge_settings(args: argparse.Namespace, model: str) -> JudgeSettings:
    """The judge settings from `--api-base`, `--api-key-env`, `--cache-dir`, `--timeout`, `--max-retries` and
    `--backoff` (any of which may be absent)."""
    return JudgeSettings(getattr(args, "api_base", None), model, api_key_env=getattr(args, "api_key_env", None),
                         cache_dir=getattr(args, "cache_dir", None), timeout=getattr(args, "timeout", 60.0),
                         max_retries=getattr(args, "max_retries", 6), backoff=getattr(args, "backoff", 1.0))


# ---------------------------------------------------------------------------------------------- run
RUN_EXAMPLES = """examples:
  xllava eval run --benchmark gqa --ckpt ckpt/xllava --data llava_gqa_testdev_balanced.jsonl \\
      --image-root gqa/images --out runs/eval/gqa
  xllava eval run --benchmark kmmbench --ckpt ckpt/xllava --data K-MMBench_DEV.tsv --all-rounds --out runs/eval/kmmb
  xllava eval run --benchmark synth_vqa --ckpt runs/vif/final --data synth/vqa_heldout_ko.jsonl \\
      --image-root synth --out runs/eval/synth_ko --limit 200
Rerunning the same command resumes: answered questions are skipped.
"""


def run_answers(args: argparse.Namespace) -> None:
    """The `eval run` handler: prints the summary JSON as the last stdout line."""
    from xllava_jax.eval.runner import RunOptions, run_eval
    from xllava_jax.train.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)
    opts = RunOptions(benchmark=args.benchmark, ckpt=args.ckpt, data=args.data, out=args.out,
                      image_root=args.image_root, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      template=args.template, mode=args.mode, lang=args.lang, limit=args.limit,
                      all_rounds=args.all_rounds, temperature=args.temperature, num_devices=args.num_devices)
    print(json.dumps(run_eval(opts), ensure_ascii=False))


def add_run_parser(steps) -> None:
    """Add `eval run` to the eval subcommands."""
    p = steps.add_parser("run", help="answer a benchmark's questions with a checkpoint (LLaVA answer JSONL)",
                         epilog=RUN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Generate answers for a benchmark's question file (LLaVA question JSONL, "
                                     "VQAv2 or GQA questions JSON, POPE, or MMBench-style TSV) into "
                                     "OUT/answers.jsonl, greedy by default. Prints one JSON summary line.")
    p.add_argument("--benchmark", required=True, choices=RUN_BENCHMARKS, help="which benchmark the file belongs to")
    p.add_argument("--ckpt", required=True, help="our checkpoint or a Hugging Face directory (with tokenizer)")
    p.add_argument("--data", required=True, help="the question file")
    p.add_argument("--image-root", help="directory the image paths are under (default: the question file's)")
    p.add_argument("--out", required=True, help="output directory (answers.jsonl)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per batch (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--template", choices=TEMPLATES, help=TEMPLATE_HELP)
    p.add_argument("--mode", choices=MODES, help=MODE_HELP)
    p.add_argument("--lang", choices=["en", "ko", "zh"],
                   help="instruction language (default: the benchmark's; a question's `lang` key wins)")
    p.add_argument("--limit", type=int, help="answer only the first N questions")
    p.add_argument("--all-rounds", action="store_true",
                   help="multiple choice: one round per option, options rotated (circular evaluation)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default: %(default)s)")
    p.add_argument("--num-devices", type=int, help="local devices to spread each batch over (default: all)")
    p.add_argument("--coordinator", help="host:port of process 0, for multi-process runs without auto-detection")
    p.add_argument("--num-processes", type=int, help="number of processes (with --coordinator)")
    p.add_argument("--process-id", type=int, help="this process's index (with --coordinator)")
    p.set_defaults(run=run_answers, flags=RUN_FLAGS)


# ---------------------------------------------------------------------------------------------- score
SCORE_EXAMPLES = """examples:
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
                              description=DESCRIPTION, epilog=SCORE_EXAMPLES,
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
    p.set_defaults(run=run_score, flags=SCORE_FLAGS)
    return p


def judge_llava_bench(args: argparse.Namespace) -> dict:
    """`score_llava_bench` with the flags of `xllava eval score` (absent judge flags take their defaults)."""
    from xllava_jax.eval.judge import score_llava_bench

    if not args.questions or not args.annotations:
        raise UserError(f"--benchmark {args.benchmark} needs --questions (questions.jsonl) and --annotations "
                        "(the reference answers jsonl)")
    settings = judge_settings(args, getattr(args, "judge_model", None) or "gpt-4-0613")
    concurrency = getattr(args, "concurrency", None)
    try:
        return score_llava_bench(args.benchmark, args.questions, args.annotations[0], args.answers, settings,
                                 context_path=getattr(args, "context", None),
                                 image_root=getattr(args, "image_root", None),
                                 concurrency=4 if concurrency is None else concurrency, out=getattr(args, "out", None))
    except UserError as err:  # the command's spelling, also for callers that do not go through `xllava_jax.cli.main`
        err.args = (SCORE_FLAGS.spell(str(err)),)
        raise


def _judge(args: argparse.Namespace) -> dict:
    if args.rules is not None:
        raise ScoreError(f"--rules does not apply to {args.benchmark}")
    return judge_llava_bench(args)


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


# ---------------------------------------------------------------------------------------------- preference
PREFERENCE_EXAMPLES = """examples:
  xllava eval preference --questions llava_bench_ko/questions.jsonl --image-root llava_bench_ko/images \\
      --answers-a xllava.jsonl --answers-b llava15.jsonl --name-a X-LLaVA --name-b LLaVA-1.5 \\
      --api-base https://api.openai.com/v1 --judge-model gpt-4o --out pref/xllava_vs_llava15
  xllava eval preference ... --truncate-words 30 --one-order --out pref/30words_paper_protocol

""" + EXIT_STATUS_HELP


def run_preference(args: argparse.Namespace) -> int:
    """Judge every question both answer files answer; write judgements.jsonl, preference.json and
    preference.png under `--out`, and print preference.json as the last stdout line. The exit status is
    EXIT_SOME_FAILED when some pairs could not be judged, else 0."""
    from xllava_jax.eval.preference import judge_preference

    summary = judge_preference(args.questions, args.answers_a, args.answers_b,
                               judge_settings(args, args.judge_model), args.out, image_root=args.image_root,
                               truncate=args.truncate_words, one_order=args.one_order, name_a=args.name_a,
                               name_b=args.name_b, concurrency=args.concurrency)
    print(json.dumps(summary, ensure_ascii=False))
    return EXIT_SOME_FAILED if summary["failed"] else 0


def add_preference_parser(steps) -> argparse.ArgumentParser:
    """Add `preference` to the `xllava eval` subcommands."""
    from xllava_jax.eval.preference import __doc__ as preference_doc

    p = steps.add_parser("preference", help="pairwise preference of two models' answers by an LLM judge",
                         description=preference_doc.split("\n\n", 1)[1], epilog=PREFERENCE_EXAMPLES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", required=True, help="LLaVA question JSONL (question_id, image, text)")
    p.add_argument("--answers-a", required=True, help="answer JSONL of model A (the one the result is reported for)")
    p.add_argument("--answers-b", required=True, help="answer JSONL of model B")
    p.add_argument("--api-base", required=True, help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    p.add_argument("--judge-model", required=True, help="the judge model's name at that endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key "
                   "(default: %(default)s; may be unset for a local server)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="judge reply cache (default: %(default)s)")
    p.add_argument("--image-root", help="directory of the questions' images; without it the judge sees no image")
    p.add_argument("--truncate-words", type=int, help="cut every answer to its first N words (the paper: 30)")
    p.add_argument("--one-order", action="store_true", help="judge each pair once with A shown first (the paper)")
    p.add_argument("--name-a", help="name of model A in the outputs (default: its answers' model_id)")
    p.add_argument("--name-b", help="name of model B in the outputs (default: its answers' model_id)")
    p.add_argument("--concurrency", type=int, default=4, help="judge calls in flight (default: %(default)s)")
    add_endpoint_options(p)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(run=run_preference, flags=PREFERENCE_FLAGS)
    return p


# ---------------------------------------------------------------------------------------------- report
REPORT_EXAMPLES = """examples:
  xllava eval report --scores scores/*.json --out report/
  xllava eval report --scores runs/a/scores/*.json runs/b/scores/*.json --with-paper --title "X-LLaVA 13B vs ours"
  xllava eval report --scores koviz.json koviz_strict.json --model "ours (paper rules)" "ours (strict)"
"""


def run_report(args: argparse.Namespace) -> int:
    """Build, print and (with --out) write the report."""
    from xllava_jax.eval.report import build_report, load_scores, render_markdown

    report = build_report(load_scores(args.scores, args.model or []), args.title, args.with_paper)
    markdown = render_markdown(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(markdown, encoding="utf-8")
        (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(markdown, end="")
    return 0


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Add `report` to the `xllava eval` subcommands."""
    p = subparsers.add_parser(
        "report", help="tables of scores, in the paper's Table 3 layout", epilog=REPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read metrics JSON files (from `xllava eval score --out`, or any JSON with `benchmark` and\n"
                    "`accuracy`) and build one row per model: the paper's Table 3 columns (BVQA-ko, KoViz, KoLiv,\n"
                    "BVQA-en, VQAv2, GQA, LLaVA-Bench, POPE accuracy), then the other benchmarks. Prints markdown;\n"
                    "with --out writes OUT/report.md and OUT/report.json.")
    p.add_argument("--scores", required=True, nargs="+", help="metrics JSON files")
    p.add_argument("--out", help="directory for report.md and report.json (created)")
    p.add_argument("--title", default="X-LLaVA evaluation", help="report title (default: %(default)s)")
    p.add_argument("--model", nargs="+", help="row name for every file, or one per --scores file "
                                              "(default: each file's model_id)")
    p.add_argument("--with-paper", action="store_true", help="add the paper's Table 3 rows for comparison")
    p.set_defaults(run=run_report, flags=REPORT_FLAGS)
    return p


# ---------------------------------------------------------------------------------------------- perplexity
PERPLEXITY_EXAMPLES = """examples:
  xllava eval perplexity --ckpt runs/llm_pretrain/final --text heldout_en.txt heldout_ko.txt
  xllava eval perplexity --ckpt ckpt/xllava --text wiki_ko.txt --seq-len 1024 --batch-size 4 --out ppl.json
"""


def run_perplexity(args: argparse.Namespace) -> None:
    """The `eval perplexity` handler: per-file figures, one JSON object on the last stdout line."""
    from xllava_jax.eval.perplexity import Scorer, score_file
    from xllava_jax.infer.engine import Engine

    engine = Engine.load(args.ckpt, tokenizer=args.tokenizer)
    scorer = Scorer(engine, args.seq_len, args.batch_size)
    files = {str(path): score_file(scorer, path) for path in args.text}
    result = {"benchmark": "perplexity", "model_id": engine.model_id, "seq_len": args.seq_len, "files": files}
    text = json.dumps(result, ensure_ascii=False)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)


def add_perplexity_parser(steps) -> None:
    """Add `eval perplexity` to the eval subcommands."""
    p = steps.add_parser("perplexity", help="NLL per token, perplexity and bits per character of text files",
                         epilog=PERPLEXITY_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Score text files (one document per line, each starting with bos; "
                                     "windows of --seq-len without overlap). Prints one JSON object.")
    p.add_argument("--ckpt", required=True, help="our checkpoint or a Hugging Face directory")
    p.add_argument("--text", required=True, nargs="+", help="UTF-8 text file(s), one document per line")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens, bos included (default: 512)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per batch (default: %(default)s)")
    p.add_argument("--tokenizer", help="tokenizer.model to use instead of the checkpoint's")
    p.add_argument("--out", help="also write the JSON to this file")
    p.set_defaults(run=run_perplexity, flags=PERPLEXITY_FLAGS)
