"""Class-conditional sampling with DiT / SiT (ImageNet), CFG against ERG.

Published weights as downloaded, converted on first use into WORKDIR/converted (or
--config.model.cache_dir) and reused afterwards:

    # a diffusers DiT pipeline folder (facebook/DiT-XL-2-256, facebook/DiT-XL-2-512):
    # its VAE and its scheduler (DDIM, "leading" spacing) come with it
    python -m launch.sample --config=configs/dit.py:xl2_256 --workdir=out/dit \
        --config.model.pretrained=DiT-XL-2-256
    # an original .pt (facebookresearch/DiT, willisma/SiT; reading it needs torch): the
    # size is read off the file, the VAE is a diffusers folder (stabilityai/sd-vae-ft-ema)
    python -m launch.sample --config=configs/dit.py:xl2_512 --workdir=out/dit512 \
        --config.model.pretrained=DiT-XL-2-512x512.pt --config.vae.pretrained=sd-vae-ft-ema
    python -m launch.sample --config=configs/dit.py:sit_xl2_256 --workdir=out/sit \
        --config.model.pretrained=SiT-XL-2-256x256.pt --config.vae.pretrained=sd-vae-ft-ema
    python -m launch.sample --config=configs/dit.py:tiny --workdir=out/tiny   # CPU, seconds

Or convert ahead of time (launch.convert --source=dit-pt / diffusers-dit / diffusers-vae)
and pass --config.model.checkpoint and --config.vae.checkpoint.

Variants: xl2_512 (default), xl2_256, sit_xl2_256, tiny (random weights).

ERG on a class-conditional model has two readings (docs/METHOD.md): by default the weak
branch keeps the class and only its attention is tempered (the paper's c_tau = c: no
guidance before the kickoff); ``--config.guidance.erg.condition=null`` tempers the
null-class branch instead (CFG before the kickoff). On the shipped class model the first
gives the better FD, the second the higher consistency (docs/RESULTS.md).

``model.sample_size`` is the latent side the checkpoint must have (64 for 512px, 32 for
256px; 0 takes the checkpoint's), so a 256px file given to xl2_512 is refused rather than
sampled at the wrong size. It is the only difference between xl2_512 and xl2_256: the
DiT paper samples both with 250 DDPM steps and reports its FIDs at both resolutions with
CFG w = 1.5 (its tables 2 and 3), which we keep as the scale for every method; we know
of no ERG setting specific to 512px, so the ERG fields are the same too.

``sampler.solver`` is "" for DiT: the pipeline folder's own scheduler (DDIM) where there
is one, else DDPM ancestral sampling as in the DiT paper; name "ddim" or "ddpm" to choose.
"""

try:  # erg-jax's own name: the installed wheel, or this folder under pip install -e
    from erg_jax_configs.common import base_config
except ModuleNotFoundError:  # a checkout without erg-jax installed: configs/ on sys.path
    from configs.common import base_config

from erg_jax.models import registry

# one variant per recipe of the model kind (erg_jax/models/dit_config.py's RECIPES: the
# grid, text layout, dtypes, mesh and each method's layers of a published size)
VARIANTS = registry.get("dit").recipe_names()


def get_config(arg=None):
    arg = arg or VARIANTS[0]
    if arg not in VARIANTS:
        raise ValueError(f"configs/dit.py variant must be one of {VARIANTS}, got {arg!r}")
    c = base_config("dit", arg)
    if arg == "tiny":  # a test's job: one batch
        c.output.num_samples = 8
    return c
