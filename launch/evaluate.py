"""Measures a sampling job's methods: FID, KID, precision / recall / density / coverage,
FD-DINOv2, CLIP score, from the feature networks' weight files the user has.

    python -m launch.evaluate --workdir=out/sd3 \
        --config.evaluation.inception=pt_inception-2015-12-05-6726825d.pth \
        --config.evaluation.dinov2=dinov2-vitl14 --config.evaluation.clip=clip-vit-l14 \
        --config.evaluation.reference=coco_val2014/
    # a protocol's settings: its config's evaluation section
    python -m launch.evaluate --config=configs/coco.py --workdir=out/coco ...

Writes OUT/evaluation/metrics.json and table.md, and the table into OUT/index.html.
Features are saved per shard as they are extracted: a killed run started again resumes.
On several hosts every process runs the same command (launch/hosts.py).
"""

import jax
from absl import app, flags
from ml_collections import config_flags

from erg_jax.jobs.evaluate import evaluate, markdown_table

from . import hosts, logs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", "configs/evaluate.py", "a config with an evaluation section", lock_config=True
)
flags.DEFINE_string("workdir", None, "a sampling job's workdir (it holds manifest.json)")
flags.mark_flag_as_required("workdir")


def main(argv):
    del argv
    logs.set_up()
    if "evaluation" not in FLAGS.config:
        raise app.UsageError("--config has no evaluation section (see configs/evaluate.py)")
    hosts.start()
    result = evaluate(FLAGS.workdir, FLAGS.config.evaluation)
    if jax.process_index() == 0:
        print(markdown_table(result), end="")


if __name__ == "__main__":
    app.run(main)
