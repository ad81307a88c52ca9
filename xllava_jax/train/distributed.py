"""Multi-process start-up: `jax.distributed.initialize`, auto-detected on Cloud TPU and SLURM,
explicit coordinator flags otherwise."""

from __future__ import annotations

import os

import jax

from xllava_jax.errors import UserError


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the process group when there is one; a single plain process does nothing."""
    if coordinator:
        if num_processes is None or process_id is None:
            raise UserError("`coordinator` needs `num_processes` and `process_id`")
        # CPU processes need a collectives backend; GPUs and TPUs ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        return
    if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()  # reads the SLURM environment
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:
        jax.distributed.initialize()  # Cloud TPU pod slice: auto-detected
