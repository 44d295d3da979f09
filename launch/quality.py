"""The quality bench: FD, density, coverage and consistency over guidance methods and weights.

python -m launch.quality --config=configs/quality.py:mmdit --workdir=out/eval_text
"""

from absl import app, flags
from ml_collections import config_flags

from erg_jax.jobs.quality import run_config

from . import logs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/quality.py", "quality bench", lock_config=True)
flags.DEFINE_string("workdir", "out/eval", "where results.json, results.md, pareto.png go")


def main(argv):
    del argv
    logs.set_up()
    run_config(FLAGS.config, FLAGS.workdir)
    table = {"search": "search.md", "negative": "negative.md"}.get(FLAGS.config.mode, "results.md")
    with open(f"{FLAGS.workdir}/{table}") as f:
        print(f.read())


if __name__ == "__main__":
    app.run(main)
