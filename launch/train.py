"""Trains a demo model (rectified flow, or the attribute classifier) from a config.

    python -m launch.train --config=configs/train_shapes.py:dit --workdir=workdir/dit

Writes DIR/checkpoints/ (Orbax, resumed from on restart), DIR/metrics.jsonl and, at the
end, the EMA params to ``config.export`` (erg_jax.checkpoint format).
"""

from absl import app, flags
from ml_collections import config_flags

from erg_jax.jobs import train

from . import logs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", "configs/train_shapes.py", "training config", lock_config=True
)
flags.DEFINE_string("workdir", None, "checkpoints, metrics and caches go here", required=True)


def main(argv):
    del argv
    logs.set_up()
    train.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
