"""A tiny published-style WanPipeline folder with random weights, and its run.

``make_wan_pipeline`` builds a WanPipeline from diffusers' and transformers' own classes
(WanTransformer3DModel, AutoencoderKLWan, UMT5EncoderModel, a T5 tokenizer made here,
UniPCMultistepScheduler with flow sigmas) and ``save_pretrained``s it, so the folder has
the files and configs of Wan-AI/Wan2.1-T2V-1.3B-Diffusers at a few hundred thousand
parameters; ``two_experts`` adds a second transformer and a boundary ratio as Wan 2.2's
A14B folders have. ``run_wan`` runs diffusers' WanPipeline from given latents: the torch
reference of the parity tests.

What the VAE keeps of the published one: 8x spatial and 4x temporal compression (four
levels, time halved at the last two), so the pipeline's latent shapes are the real ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pipelines import _perturb, _seeded, make_t5_tokenizer

UMT5 = dict(d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2)
WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
    text_dim=UMT5["d_model"],
    freq_dim=16,
    ffn_dim=32,
    num_layers=3,
    rope_max_seq_len=64,
)
VAE = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    latents_mean=[0.1, -0.2, 0.3, 0.05],
    latents_std=[1.5, 0.8, 2.0, 1.2],
)


def _umt5(vocab_size: int):
    import transformers as tf

    cfg = tf.UMT5Config(
        vocab_size=vocab_size,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        **UMT5,
    )
    return tf.UMT5EncoderModel(cfg).eval()


def make_wan_pipeline(
    folder: str, *, seed: int = 0, flow_shift: float = 3.0, two_experts: bool = False
):
    """A tiny WanPipeline saved to folder; the pipeline."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    with _seeded(seed) as gen:
        tokenizer = make_t5_tokenizer()
        text_encoder = _umt5(len(tokenizer))
        transformer = WanTransformer3DModel(**WAN).eval()
        vae = AutoencoderKLWan(**VAE).eval()
        for module in (text_encoder, transformer, vae):
            _perturb(module, gen)
        second = None
        if two_experts:
            second = WanTransformer3DModel(**WAN).eval()
            _perturb(second, gen)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=flow_shift,
    )
    kw = dict(transformer_2=second, boundary_ratio=0.875) if two_experts else {}
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        **kw,
    )
    pipe.save_pretrained(folder)
    return pipe


def run_wan(
    pipe,
    prompts: Sequence[str],
    latents: np.ndarray,
    *,
    steps: int = 3,
    guidance_scale: float = 1.0,
    guidance_scale_2: float | None = None,
    negative_prompts: Sequence[str] | None = None,
    max_sequence_length: int = 512,
) -> np.ndarray:
    """diffusers' Wan sampling from latents (b, f, h, w, c) channel-last; the video
    (b, 1 + 4 (f - 1), 8 h, 8 w, 3) in [0, 1], before any 8-bit rounding.

    guidance_scale <= 1 runs without CFG; with CFG and no negative prompts the
    negatives are "" (the pipeline's default).
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(np.transpose(latents, (0, 4, 1, 2, 3))))
    kw = {} if guidance_scale_2 is None else {"guidance_scale_2": guidance_scale_2}
    with torch.no_grad():
        out = pipe(
            prompt=list(prompts),
            negative_prompt=None if negative_prompts is None else list(negative_prompts),
            height=latents.shape[2] * 8,
            width=latents.shape[3] * 8,
            num_frames=1 + 4 * (latents.shape[1] - 1),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            latents=x.float(),
            output_type="np",
            max_sequence_length=max_sequence_length,
            **kw,
        )
    return np.asarray(out.frames, np.float32)
