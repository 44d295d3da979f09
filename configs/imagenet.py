"""The class-conditional protocol: DiT-XL/2 on ImageNet, 50k samples with the classes
balanced (sample i draws class i mod 1000, 50 per class), FID / KID / precision / recall /
density / coverage against the reference batch's statistics.

    python -m launch.sample --config=configs/imagenet.py:xl2_256 --workdir=out/imagenet \
        --config.model.pretrained=DiT-XL-2-256
    # ADM's reference batch (VIRTUAL_imagenet256_labeled.npz: mu, sigma and 10k images as
    # arr_0) serves as it is: FID from its statistics, the rest from its images' features
    python -m launch.evaluate --config=configs/imagenet.py:xl2_256 --workdir=out/imagenet \
        --config.evaluation.inception=pt_inception-2015-12-05-6726825d.pth \
        --config.evaluation.reference=VIRTUAL_imagenet256_labeled.npz

Variants: the DiT recipes (xl2_512, xl2_256, sit_xl2_256, tiny). Every method at
guidance.scale (cfg, erg, cfg+apg... as guidance.methods says; default cfg, erg, pag,
seg: 2 forwards per step each).
"""

try:  # erg-jax's own name: the installed wheel, or this folder under pip install -e
    from erg_jax_configs.common import base_config
except ModuleNotFoundError:  # a checkout without erg-jax installed: configs/ on sys.path
    from configs.common import base_config

from erg_jax.jobs import evaluate
from erg_jax.models import registry

VARIANTS = registry.get("dit").recipe_names()


def get_config(arg=None):
    arg = arg or "xl2_256"
    if arg not in VARIANTS:
        raise ValueError(f"configs/imagenet.py variant must be one of {VARIANTS}, got {arg!r}")
    c = base_config("dit", arg)
    c.conditioning.classes = "all"  # sample i draws class i mod 1000: balanced
    c.guidance.methods = "cfg,erg,pag,seg"
    c.output.num_samples = 16 if arg == "tiny" else 50_000
    c.evaluation = evaluate.section()
    c.evaluation.batch_size = 64
    return c
