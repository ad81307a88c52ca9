"""Why a run stops early: one line for the user, naming the step, the checkpoint and the setting to change."""

from __future__ import annotations

from xllava_jax.errors import UserError


class TrainingError(UserError):
    """A run that cannot go on (non-finite loss, no supervised tokens, a checkpoint that does not fit)."""


class Preempted(TrainingError):
    """SIGTERM / SIGINT arrived: a checkpoint was saved at the current step."""
