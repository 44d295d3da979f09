"""The quickstart: CFG against ERG on the shipped text-to-image demo model (models/).

    python -m launch.quickstart --config=configs/quickstart.py --workdir=out/demo
    python -m launch.quickstart --config=configs/quickstart.py --workdir=out/demo \
        --config.guidance.erg.scale=2 --config.guidance.erg.tau_c=0.5

Writes out/demo/grid.png (a labelled row per method, a column per prompt, the same noise
in every row), out/demo/metrics.json and metrics.md (consistency read by the shipped
attribute classifier, with its standard error) and out/demo/index.html (all of it).
"""

import ml_collections

from erg_jax import guidance


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.kind = "quickstart"
    c.seed = 0
    c.models_dir = "models"
    c.classifier = "models/classifier"
    c.prompts = (
        "a small red circle in the upper left|a large blue square in the center|"
        "a medium green triangle on the right|a small yellow cross at the bottom|"
        "a large purple ring in the lower left|a medium orange diamond at the top"
    )
    c.samples_per_prompt = 16  # 96 samples per method: consistency +- about 0.05
    c.grid_per_prompt = 2  # of which the grid shows the first two of each prompt
    c.steps = 20
    # Each method at the weight the bench found best for it on this model (docs/RESULTS.md,
    # "before and after fine-tuning"): CFG's consistency peaks at w = 4; ERG is the
    # search's choice, C-ERG alone at tau_c = 0.7 (tau = 1 leaves the denoiser's attention
    # as it is), best at w = 1.5; ERG+APG runs ERG's setting and weight with APG's
    # negative momentum (Sadat et al.'s recommendation).
    c.guidance = ml_collections.ConfigDict(dict(methods="none,cfg,erg,erg+apg", scale=2.0))
    c.guidance.update(guidance.defaults())
    c.guidance.cfg.scale = 4.0
    c.guidance.erg.update(scale=1.5, tau=1.0, tau_c=0.7)
    c.guidance.apg.momentum = -0.5
    if arg == "runlocal":
        c.samples_per_prompt, c.grid_per_prompt, c.steps = 1, 1, 4
    return c
