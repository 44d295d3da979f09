"""The evaluation job's settings: which feature networks, which reference, how to batch.

    python -m launch.evaluate --workdir=out/sd3 \
        --config.evaluation.inception=pt_inception-2015-12-05-6726825d.pth \
        --config.evaluation.reference=real_images/

Any config with an ``evaluation`` section serves (configs/coco.py, configs/imagenet.py
carry their protocol's); this file holds the defaults alone. The fields and what they
mean: erg_jax/jobs/evaluate.py.
"""

import ml_collections

from erg_jax.jobs import evaluate


def get_config(arg=None):
    if arg:
        raise ValueError(f"configs/evaluate.py has no variants, got {arg!r}")
    return ml_collections.ConfigDict(dict(evaluation=evaluate.section()))
