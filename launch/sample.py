"""Samples a job config with one or several guidance methods, on every device given.

    python -m launch.sample --config=configs/dit.py:tiny --workdir=out/tiny
    python -m launch.sample --config=configs/sd3.py:medium --workdir=out/sd3 \
        --config.guidance.methods=cfg,erg,erg+apg --config.guidance.scale=4
    # will it fit? per-device bytes and the batch that fits, nothing loaded (dry_run.json)
    python -m launch.sample --config=configs/sd3.py:large --workdir=out/dry \
        --config.dry_run=True --config.mesh.fsdp=8 --config.dry_run_memory_gb=16

On several hosts (a TPU pod: launch/tpu_pod.sh) every process runs the same command;
jax.distributed is initialised from the environment. Elsewhere, start each process by
hand with the same command plus --coordinator_address=HOST:PORT --num_processes=N
--process_id=I.
"""

import json
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from erg_jax.jobs.job import run_sampling

from . import hosts, logs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "job config file[:variant]", lock_config=True)
flags.DEFINE_string("workdir", None, "output folder (created; a rerun continues it)")
flags.mark_flags_as_required(["config", "workdir"])


def _dry_run(config, workdir: str) -> None:
    """Prints the dry run's table (erg_jax/jobs/dry_run.py). The CPU backend gets as many
    devices as the mesh names (an axis of -1 counted as 1) unless XLA_FLAGS says how many;
    on a host with accelerators, JAX_PLATFORMS=cpu makes it use CPU devices instead."""
    from erg_jax.jobs import dry_run

    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", dry_run.devices_needed(config.mesh))
    print(dry_run.format_table(dry_run.dry_run(config, workdir)))


def main(argv):
    del argv
    logs.set_up()  # the job's own INFO lines (compile times) stay
    if FLAGS.config.dry_run:
        _dry_run(FLAGS.config, FLAGS.workdir)
        return
    hosts.start()
    summary = run_sampling(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        brief = {
            m: {k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()}
            for m, s in summary["methods"].items()
        }
        print(
            json.dumps(
                {
                    "methods": brief,
                    "compiles": summary["compiles"],
                    "seconds_to_first_image": summary["seconds_to_first_image"],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    app.run(main)
