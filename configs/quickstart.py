"""The main job: CFG against ERG on the shipped text-to-image demo model (models/).

    python -m launch.demo --config=configs/quickstart.py --workdir=out/demo
    python -m launch.demo --config=configs/quickstart.py --workdir=out/demo \
        --config.guidance.scale=5 --config.guidance.tau=0.3

Writes out/demo/grid.png (a labelled row per method, a column per prompt, the same noise
in every row), out/demo/metrics.json and metrics.md (consistency read by the shipped
attribute classifier, with its standard error) and out/demo/index.html (all of it).
"""

import ml_collections


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
    c.methods = "none,cfg,erg,erg+apg"
    # ERG is the bench's choice for this model (docs/RESULTS.md): C-ERG alone, tau_c = 0.7
    # (tau = 1 leaves the denoiser's attention as it is); w = 2, the bench's common weight
    c.guidance = ml_collections.ConfigDict(
        dict(scale=2.0, tau=1.0, tau_c=0.7, kappa=0.0, layers="")
    )
    if arg == "runlocal":
        c.samples_per_prompt, c.grid_per_prompt, c.steps = 1, 1, 4
    return c
