"""The entropy probe: attention entropy per layer and head at several temperatures tau,
over the sampling steps, in the denoiser and the text encoder, for choosing ERG's tau
and layers (docs/METHOD.md, "Choosing tau and layers").

    python -m launch.entropy --config=configs/entropy.py:mmdit --workdir=out/entropy_mmdit
    python -m launch.entropy --config=configs/entropy.py:dit --workdir=out/entropy_dit
    python -m launch.entropy --config=configs/entropy.py:mmdit --workdir=out/entropy \
        --config.taus="(0.05,0.2,0.5,1.0,2.0)" --config.steps=20 --config.num_samples=8
    python -m launch.entropy --config=configs/entropy.py:sd3_tiny --workdir=out/entropy_sd3

Variants: mmdit and dit (the shipped demo models in models/), sd3_tiny and dit_tiny
(configs/sd3.py:tiny and configs/dit.py:tiny, random tiny models: any field of those
job configs is set as --config.job.FIELD, e.g. a checkpoint with
--config.job.model.checkpoint=DIR --config.job.model.random_init=False).
Writes WORKDIR/entropy.json (entropy indexed by tau, step, layer, head; the text
encoders' by tau, layer, head; means over the samples and prompts) and the PNGs
entropy_denoiser.png, entropy_heads.png, entropy_text.png (text models).
"""

import ml_collections

try:  # erg-jax's own name: the installed wheel, or this folder under pip install -e
    from erg_jax_configs import dit, sd3
    from erg_jax_configs.common import base_config
except ModuleNotFoundError:  # a checkout without erg-jax installed: configs/ on sys.path
    from configs import dit, sd3
    from configs.common import base_config

VARIANTS = ("mmdit", "dit", "sd3_tiny", "dit_tiny")


def get_config(arg=None):
    arg = arg or "mmdit"
    if arg not in VARIANTS:
        raise ValueError(f"configs/entropy.py variant must be one of {VARIANTS}, got {arg!r}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    # "demo": a shipped model in demo.models_dir; "job": the sampling-job config in `job`
    c.source = "demo" if arg in ("mmdit", "dit") else "job"
    c.demo = ml_collections.ConfigDict(dict(kind=arg if c.source == "demo" else "mmdit"))
    c.demo.models_dir = "models"
    c.taus = (0.01, 0.1, 0.3, 0.6, 1.0)  # probe temperatures, each > 0
    c.steps = 10  # sampling steps (Euler on the demo models; the job's solver otherwise)
    c.num_samples = 4  # samples of the trajectory; entropies are their mean
    # the trajectory: "none" (unguided) or a sampling-job method ("cfg", "erg", ...) of
    # the guidance section, probed on its strong branch
    c.method = "none"
    c.guidance = base_config().guidance  # the demo models' guidance (job: job.guidance)
    # demo mmdit: "|"-separated prompts, cycled over the samples; demo dit: the classes
    c.prompts = (
        "a small red circle in the upper left|a large blue square in the center|"
        "a medium green triangle on the right|a small yellow cross at the bottom"
    )
    c.classes = "all"
    c.text_probe = True  # also probe the text encoder(s) of a text model
    c.layers = ""  # the layers drawn in entropy_denoiser.png: "" = all, or "0,2"
    c.heatmap_step = -1  # the step of the layer x head heatmap; negative: from the end
    c.plots = True  # the PNGs (Pillow); entropy.json is always written
    if c.source == "job":
        c.job = sd3.get_config("tiny") if arg == "sd3_tiny" else dit.get_config("tiny")
        c.steps = 4
    return c
