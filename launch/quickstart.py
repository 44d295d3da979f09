"""The quickstart: several guidance methods from the same noise, side by side.

    python -m launch.quickstart --config=configs/quickstart.py --workdir=out/demo  # shipped
    python -m launch.quickstart --config=configs/toy.py --workdir=out/toy          # exact toy

Writes DIR/grid.png (a labelled row of samples per method), DIR/metrics.json and, for the
shipped model, DIR/metrics.md and DIR/index.html. It prints the results; --verbose (every
launcher's flag, launch/logs.py) adds the libraries' INFO logs.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

from erg_jax.jobs.quickstart import run_quickstart, run_toy

from . import logs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/quickstart.py", "job config", lock_config=True)
flags.DEFINE_string("workdir", "out/demo", "where images and metrics are written")


def main(argv):
    del argv
    logs.set_up()
    os.makedirs(FLAGS.workdir, exist_ok=True)
    if FLAGS.config.get("kind") == "quickstart":
        run_quickstart(FLAGS.config, FLAGS.workdir)  # prints its table
        print(f"wrote {os.path.join(FLAGS.workdir, 'index.html')}")
    else:
        print(json.dumps(run_toy(FLAGS.config, FLAGS.workdir), indent=2))


if __name__ == "__main__":
    app.run(main)
