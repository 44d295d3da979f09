"""Several processes (a TPU pod, SLURM, or started by hand): the flags and the start.

Every process of a multi-host job runs the same command; jax.distributed is initialised
from the environment, or, for a job started by hand, from --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (all three).
"""

from __future__ import annotations

import os

import jax
from absl import app, flags

DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    None,
    "call jax.distributed.initialize() (default: when the environment names several processes)",
)
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a job started by hand"
)
PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "processes in the job, for a job started by hand"
)
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "this process's index, for a job started by hand"
)


def several_processes() -> bool:
    """True when the environment describes a multi-process job (TPU pod, SLURM, manual)."""
    env = os.environ
    return (
        "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or bool(env.get("JAX_COORDINATOR_ADDRESS"))
        or int(env.get("SLURM_NTASKS", "1")) > 1
    )


def start() -> None:
    """Initialises jax.distributed as the flags or the environment say (or not at all)."""
    by_hand = dict(
        coordinator_address=COORDINATOR.value,
        num_processes=PROCESSES.value,
        process_id=PROCESS_ID.value,
    )
    if any(v is not None for v in by_hand.values()):
        missing = [k for k, v in by_hand.items() if v is None]
        if missing:
            raise app.UsageError(f"a job started by hand needs all three flags; missing {missing}")
        if not 0 <= PROCESS_ID.value < PROCESSES.value:
            raise app.UsageError(
                f"--process_id must be in [0, {PROCESSES.value}), got {PROCESS_ID.value}"
            )
        jax.distributed.initialize(**by_hand)
    elif several_processes() if DISTRIBUTED.value is None else DISTRIBUTED.value:
        jax.distributed.initialize()  # the cluster (TPU pod, SLURM, ...) is detected
