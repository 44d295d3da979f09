"""Writes the HTML report of a sampling job's workdir (the job also writes it when done).

    python -m launch.report --workdir=out/sd3

DIR/index.html: a labelled grid (a row per method, a column per sample with its prompt
or class), samples and speed per method, and the job's model, sampler and guidance
settings; DIR/report_grid.png is the grid.
"""

from absl import app, flags

from erg_jax.jobs.report import job_report

from . import logs

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a sampling job's workdir (it holds manifest.json)")
flags.DEFINE_integer("columns", 8, "samples per method in the grid")
flags.mark_flag_as_required("workdir")


def main(argv):
    del argv
    logs.set_up()
    print(job_report(FLAGS.workdir, columns=FLAGS.columns))


if __name__ == "__main__":
    app.run(main)
