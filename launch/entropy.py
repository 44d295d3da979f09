"""The entropy probe: attention entropy per layer, head and temperature over the steps.

python -m launch.entropy --config=configs/entropy.py:mmdit --workdir=out/entropy
"""

from absl import app, flags
from ml_collections import config_flags

from erg_jax.jobs.entropy import print_summary, run_entropy

from . import logs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/entropy.py", "probe config", lock_config=True)
flags.DEFINE_string("workdir", "out/entropy", "where entropy.json and the PNGs go")


def main(argv):
    del argv
    logs.set_up()
    print_summary(run_entropy(FLAGS.config, FLAGS.workdir), FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
