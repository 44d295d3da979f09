"""The built-in toy job: CFG against ERG on an exact denoiser of stored shape images.

Runs in seconds on a CPU, with nothing to download:

    python -m launch.quickstart --config=configs/toy.py --workdir=out/demo
    python -m launch.quickstart --config=configs/toy.py --workdir=out/demo \
        --config.guidance.scale=5 --config.guidance.erg.tau=0.3
"""

import ml_collections

from erg_jax import guidance


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(num_classes=4, per_class=16, size=16, pattern_seed=0))
    c.sampler = ml_collections.ConfigDict(dict(solver="euler", steps=25, shift=1.0))
    c.guidance = ml_collections.ConfigDict(dict(methods="none,cfg,erg", scale=3.0))
    c.guidance.update(guidance.defaults())
    c.guidance.erg.condition = "cond"  # class labels: the weak branch keeps the class
    c.output = ml_collections.ConfigDict(dict(samples_per_class=16))
    if arg == "runlocal":
        c.output.samples_per_class = 4
        c.sampler.steps = 8
    return c
