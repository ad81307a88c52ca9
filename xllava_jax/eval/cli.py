"""`xllava eval run|score|preference|report`: each subcommand lives in its own module, which adds its parser
with `set_defaults(run=...)`; `xllava_jax.cli.main` calls `args.run(args)`."""

from __future__ import annotations


def add_eval_parser(subparsers) -> None:
    """Add `eval` and its subcommands to the `xllava` subcommands."""
    p = subparsers.add_parser("eval", help="evaluate: generate answers, score them, judge pairs, report",
                              description="Evaluation binaries of the X-LLaVA recipe.")
    steps = p.add_subparsers(dest="eval_command", required=True)
    from xllava_jax.eval.preference import add_preference_parser

    add_preference_parser(steps)
    from xllava_jax.eval.runner import add_run_parser

    add_run_parser(steps)
    from xllava_jax.eval.perplexity import add_perplexity_parser

    add_perplexity_parser(steps)
    from xllava_jax.eval.report import add_report_parser
    from xllava_jax.eval.score import add_score_parser

    add_score_parser(steps)
    add_report_parser(steps)
