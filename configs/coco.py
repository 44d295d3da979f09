"""The paper's text-to-image protocol: COCO captions at 512 px on SD3.5, every method at
the same cost, then FID, KID, density / coverage, precision / recall, FD-DINOv2 and CLIP
score against real COCO images.

    # 1. sample: 30k captions of captions_val2014.json (one per image, a fixed random
    #    order), 512 px, cfg, apg, erg, erg+apg, erg+cads
    python -m launch.sample --config=configs/coco.py:medium --workdir=out/coco \
        --config.model.pretrained=sd35m --config.text.prompts_file=captions_val2014.json
    # 2. measure: the user's weight files; the reference is a folder of real images
    #    (center-cropped and resized to 512) or an .npz of Inception statistics (mu, sigma)
    python -m launch.evaluate --config=configs/coco.py:medium --workdir=out/coco \
        --config.evaluation.inception=pt_inception-2015-12-05-6726825d.pth \
        --config.evaluation.dinov2=dinov2-vitl14 --config.evaluation.clip=clip-vit-large-patch14 \
        --config.evaluation.reference=val2014/

Variants: medium (SD3.5 medium, default), large (SD3.5 large), tiny (a random tiny MMDiT
with the real MiniLM encoder, for a run on CPU). Every method at guidance.scale (one
weight for all, 2 forwards per step each); the paper's own model is not public, so these
are SD3.5's numbers, not a reproduction of its table.
"""

try:  # erg-jax's own name: the installed wheel, or this folder under pip install -e
    from erg_jax_configs.common import base_config
except ModuleNotFoundError:  # a checkout without erg-jax installed: configs/ on sys.path
    from configs.common import base_config

from erg_jax.jobs import evaluate

VARIANTS = ("medium", "large", "tiny")
METHODS = "cfg,apg,erg,erg+apg,erg+cads"


def get_config(arg=None):
    arg = arg or VARIANTS[0]
    if arg not in VARIANTS:
        raise ValueError(f"configs/coco.py variant must be one of {VARIANTS}, got {arg!r}")
    c = base_config("mmdit", arg)
    c.guidance.methods = METHODS
    c.text.prompts = ""  # the captions file's, only (the tiny recipe has prompts of its own)
    c.output.num_samples = 30_000
    c.output.progress = True
    if arg != "tiny":
        c.model.sample_size = 64  # latents of 512 x 512 images (the VAE downsamples by 8)
    else:
        c.output.num_samples = 16
    c.evaluation = evaluate.section()
    c.evaluation.prdc_features = "inception"
    c.evaluation.nearest_k = 5  # density / coverage as the paper reports them
    return c
