"""`xllava demo`: the whole recipe at toy scale (see `xllava_jax/demo/pipeline.py`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLES = """examples:
  xllava demo                          # everything, into demo_out/ (see README for the time on 2 CPU cores)
  xllava demo --out runs/demo          # rerun the same command after an interruption: finished steps are skipped
  xllava demo --smoke --out runs/demo  # a later run with other settings in runs/demo redoes the steps they change
  xllava demo --ablation               # also the paper's Table 2 variants (about 3x longer)
"""


def add_demo_parser(subparsers) -> None:
    """Add `demo` to the `xllava` subcommands."""
    p = subparsers.add_parser(
        "demo", help="run the whole X-LLaVA recipe at toy scale and report what it learned", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Synthesise a bilingual corpus, train and expand a tokenizer, pretrain a tiny CLIP vision tower "
                    "contrastively, train the three X-LLaVA stages (llm_pretrain, align, vif; vif starts on short "
                    "colour and shape questions, then adds position and yes/no questions, then the four task types), "
                    "evaluate on the held-out split in English and Korean, and write OUT/report/report.md + "
                    "report.png. Each step records the settings that made its outputs: a rerun skips the steps "
                    "finished with the same settings and resumes an interrupted one, and redoes a step made with "
                    "other settings (a --smoke run's, say) and everything after it.")
    p.add_argument("--out", default="demo_out", help="output directory (default: %(default)s)")
    p.add_argument("--ablation", action="store_true",
                   help="also train without vocabulary expansion, without LLM pretraining and without the "
                        "generated four-task data; writes OUT/report/ablation.md")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps: checks the plumbing in a minute")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus and of every stage (default: 0)")
    p.set_defaults(run=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    import dataclasses

    from xllava_jax.demo.pipeline import DemoSettings, run_demo

    settings = DemoSettings.smoke() if args.smoke else DemoSettings()
    use_compilation_cache(Path(args.out) / "shared" / "compilation_cache")
    result = run_demo(args.out, dataclasses.replace(settings, seed=args.seed), ablation=args.ablation)
    summary = {"report": result["report"], "timings": result["timings"], "matmul_gflops": result["matmul_gflops"],
               "accuracy": {name: {lang: r["scores"][lang]["accuracy"] for lang in ("en", "ko")}
                            for name, r in result["results"].items()}}
    print(json.dumps(summary, ensure_ascii=False))
    return 0


def use_compilation_cache(directory: Path) -> None:
    """Keep the programs XLA compiles in `directory`: the two short-question stages share their train step,
    and a rerun (after an interruption, or with --ablation) compiles nothing it compiled before."""
    import jax

    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
