"""Per-step metrics: JSONL (always), TensorBoard event files, and a PNG of the loss curves."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from xllava_jax.jsonl import read_journal

METRICS_FILE = "metrics.jsonl"
log = logging.getLogger("xllava.train")


def _step_problem(row: dict) -> str | None:
    step = row.get("step")
    return None if isinstance(step, int) and not isinstance(step, bool) else "a metrics row without an integer step"


class MetricsWriter:
    """Appends one JSON object per step to WORKDIR/metrics.jsonl and mirrors scalars to TensorBoard.

    On resume, lines for steps after the restored checkpoint are dropped first, so the file holds
    each step once; so is a torn last line (the process killed mid-write), with a warning. Any other
    damaged line stops the resume with a JournalError naming the file and line.
    """

    def __init__(self, workdir: Path, resume_step: int, enabled: bool = True):
        self.path = Path(workdir) / METRICS_FILE
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        rows, warning = read_journal(self.path, check=_step_problem)
        if warning:
            log.warning("%s", warning)
        kept = [row for row in rows if row["step"] <= resume_step]
        if len(kept) < len(rows):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
            os.replace(tmp, self.path)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=resume_step + 1)
        self._file = self.path.open("a")

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # Strict JSON: a non-finite number (a skipped step's loss) is written as null.
        record = {"step": step, **{k: None if isinstance(v, float) and not math.isfinite(v) else v
                                   for k, v in metrics.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """The rows of WORKDIR/metrics.jsonl ([] when there is none yet), without a line still being written."""
    return read_journal(Path(workdir) / METRICS_FILE, check=_step_problem, repair=False)[0]


def plot_loss(workdirs: dict[str, str | Path], out: str | Path) -> Path:
    """A PNG of loss against step for one or more runs (label -> workdir)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, workdir in workdirs.items():
        rows = read_metrics(workdir)
        losses = [float("nan") if r["loss"] is None else r["loss"] for r in rows]
        ax.plot([r["step"] for r in rows], losses, label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)
