"""Benchmark name -> scorer, and which gold files and rules each one takes.

Every scorer takes a `ScoreRequest` and returns one metrics dict with at least `benchmark`, `rules`, `model_id`,
`questions`, `missing` and `accuracy` (percent, 2 decimals). LLaVA-Bench and K-LLaVA-W are judged by an LLM and
dispatched by `xllava_jax.eval.cli` to `xllava_jax.eval.judge`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from xllava_jax.eval.answers import ScoreError
from xllava_jax.eval.scorers import gqa, korean, multiple_choice, pope, synth, vqa
from xllava_jax.eval.scorers.common import ScoreRequest


@dataclass(frozen=True)
class Scorer:
    """A scorer and the inputs it reads: `questions` / `annotations` are "optional" or "unused"; `rules` says
    whether `--rules paper|strict` applies."""

    run: Callable[[ScoreRequest], dict]
    questions: str = "optional"
    annotations: str = "unused"
    rules: bool = False


SCORERS: dict[str, Scorer] = {
    "vqav2": Scorer(vqa.score, annotations="optional"),
    "kvqa": Scorer(vqa.score, annotations="optional"),
    "gqa": Scorer(gqa.score),
    "pope": Scorer(pope.score, annotations="optional"),
    **{name: Scorer(korean.score, rules=True) for name in korean.BENCHMARKS},
    **{name: Scorer(multiple_choice.score, questions="unused")
       for name in ("mmbench", "kmmbench", "kseed", "kmmstar", "kdtcbench")},
    "synth_vqa": Scorer(synth.score),
}
JUDGED = ("llava_bench", "kllava_w")
BENCHMARKS = (*SCORERS, *JUDGED)


def score(request: ScoreRequest) -> dict:
    """Check the request's files and flags against the benchmark and run its scorer."""
    scorer = SCORERS.get(request.benchmark)
    if scorer is None:
        raise ScoreError(f"unknown benchmark {request.benchmark!r} (one of {', '.join(SCORERS)})")
    if request.questions is not None and scorer.questions == "unused":
        raise ScoreError(f"`questions` is not read by {request.benchmark} (its gold is on the answer lines"
                         f"{' or in `annotations`' if scorer.annotations != 'unused' else ''})")
    if request.annotations and scorer.annotations == "unused":
        raise ScoreError(f"`annotations` is not read by {request.benchmark}")
    if request.rules is not None and not scorer.rules:
        raise ScoreError(f"`rules` applies to {', '.join(korean.BENCHMARKS)} only, not {request.benchmark}")
    return scorer.run(request)
