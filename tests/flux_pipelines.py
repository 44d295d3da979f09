"""A tiny published-style FluxPipeline folder with random weights, and its run.

``make_flux_pipeline`` builds a FluxPipeline, dev-like (a guidance embedding, the dynamic
shift) or schnell-like (neither), from diffusers' and transformers' own classes and the
tokenizers and text encoders of ``pipelines``, and ``save_pretrained``s it, so the folder
has the files, configs and quirks of black-forest-labs/FLUX.1-dev and -schnell at tens
of thousands of parameters. ``run_flux`` runs diffusers' FluxPipeline from given
latents: the torch reference of the parity tests.

Quirks of FluxPipeline kept here, which a reimplementation has to match:
- CLIP-L is a CLIPTextModel (no projection): pooled = its pooler_output at 77 tokens
  (argmax pooling, as the SD3 CLIPs); T5's last hidden state at max_sequence_length is
  the context. Neither encoder gets a padding mask.
- The transformer takes packed latents (b, h/2 * w/2, 4c), each 2x2 patch's channels in
  (c, dy, dx) order (``FluxPipeline._pack_latents``); the run packs ours that way.
- The grid is the pipeline's own sigmas linspace(1, 1/steps, steps), shifted by the
  scheduler: dev dynamically (mu from the token count), schnell not at all (shift 1).
- Every transformer call, the negative prompt's of true CFG too, gets the same guidance
  value (guidance_scale, (b,)) when the transformer has a guidance embedding; without
  one guidance_scale is ignored. True CFG runs only with true_cfg_scale > 1 and a
  negative prompt.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import numpy as np
from pipelines import (
    CLIP_L,
    T5,
    _clip_model,
    _latents,
    _perturb,
    _seeded,
    _t5_model,
    _vae,
    make_clip_tokenizer,
    make_t5_tokenizer,
    write_clip_files,
)

# 2 double + 2 single blocks; diffusers' packed view: patch 1 on 4 x 16 channels.
FLUX = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=T5["d_model"],
    pooled_projection_dim=CLIP_L["hidden_size"],  # CLIP-L's unprojected pooled output
    axes_dims_rope=(4, 6, 6),
)


def make_flux_pipeline(folder: str, *, seed: int = 0, guidance_embeds: bool = True):
    """A tiny FluxPipeline saved to folder; the pipeline. guidance_embeds: dev-like (a
    guidance embedding, dynamic shifting) or schnell-like (neither, shift 1).

    The folder holds model_index.json, transformer/, vae/ (16 channels, FLUX.1's scale and
    shift), text_encoder/ (CLIPTextModel) + tokenizer/ (vocab.json, merges.txt),
    text_encoder_2/ (T5EncoderModel) + tokenizer_2/ (tokenizer.json) and scheduler/.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with tempfile.TemporaryDirectory() as scratch:
        tok = make_clip_tokenizer(scratch)
    tok_t5 = make_t5_tokenizer()
    with _seeded(seed) as gen:
        transformer = FluxTransformer2DModel(**FLUX, guidance_embeds=guidance_embeds).eval()
        vae = _vae(
            16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            latents_mean=None,
            latents_std=None,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        clip = _clip_model(CLIP_L, len(tok), projection=False)
        t5 = _t5_model(len(tok_t5) + 7)
        for m in (transformer, vae, clip, t5):
            _perturb(m, gen)
    if guidance_embeds:  # FLUX.1-dev's scheduler_config.json
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=tok_t5,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    os.remove(os.path.join(folder, "tokenizer", "tokenizer.json"))
    write_clip_files(os.path.join(folder, "tokenizer"))
    return pipe


def run_flux(
    pipe,
    prompts: Sequence[str],
    latents_nchw: np.ndarray,
    *,
    steps: int = 3,
    guidance_scale: float = 3.5,
    true_cfg_scale: float = 1.0,
    negative_prompts: Sequence[str] | None = None,
    max_sequence_length: int = 16,
) -> np.ndarray:
    """diffusers' FLUX sampling from latents (b, 16, h, w), packed as FluxPipeline packs
    them; images (b, H, W, 3) in [0, 1]. guidance_scale reaches only a transformer with a
    guidance embedding; true CFG runs when true_cfg_scale > 1 with negative prompts."""
    import torch
    from diffusers import FluxPipeline

    latents = _latents(latents_nchw)
    b, c, h, w = latents.shape
    packed = FluxPipeline._pack_latents(latents, b, c, h, w)
    with torch.no_grad():
        out = pipe(
            prompt=list(prompts),
            negative_prompt=None if negative_prompts is None else list(negative_prompts),
            true_cfg_scale=true_cfg_scale,
            height=h * pipe.vae_scale_factor,
            width=w * pipe.vae_scale_factor,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            latents=packed,
            output_type="np",
            max_sequence_length=max_sequence_length,
        )
    return np.asarray(out.images, np.float32)
