"""Tiny published-style diffusers pipeline folders with random weights, and their runs.

``make_sd3_pipeline`` and ``make_dit_pipeline`` build a StableDiffusion3Pipeline (SD3.5
layout: QK RMS norm, a dual-attention block) and a DiTPipeline from diffusers' and
transformers' own classes and ``save_pretrained`` them, so the folders have the files,
configs and quirks of the published ones (stabilityai/stable-diffusion-3.5-*,
facebook/DiT-XL-2-256) at tens of thousands of parameters. ``write_dit_pt`` writes the DiT as an
original facebookresearch/DiT ``.pt`` state dict. ``run_sd3`` / ``run_dit`` run the
diffusers pipelines from given latents: the torch reference of the parity tests.
FLUX.1's (``flux_pipelines``) are made from the tokenizers and text encoders here.

Quirks of the published folders kept here, which a reimplementation has to match:
- SD3 pads both CLIP prompts to tokenizer.model_max_length = 77 with no attention mask;
  CLIP-L pads with its end token, CLIP-G (tokenizer_2) with "!" (id 0), so the two
  sequences differ past the prompt. The text configs say eos_token_id = 2 (from before
  transformers PR #24773), so CLIP pools at argmax(input_ids): the end token has the
  highest id. Sequence embeddings are hidden_states[-2] of each CLIP, concatenated on
  features and zero-padded to T5's d_model, then the T5 tokens follow on the sequence
  axis; pooled = concat of the two text projections.
- Without T5 (``with_t5=False``), SD3 uses zeros for the T5 tokens.
- DiTPipeline takes no latents (we patch its randn_tensor), uses class 1000 as the null
  class whatever the model's num_classes (so num_embeds_ada_norm must be 1000), guides
  the first in_channels output channels and drops the learned-sigma half.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from unittest import mock

import numpy as np

WORDS = (
    "a photo of cat dog the on red blue car sitting mat hello world big small green "
    "an astronaut riding horse"
).split()

# The text widths all differ (CLIP-L 16 / proj 12, CLIP-G 24 / proj 20, T5 48 with
# attention width 32), so a swapped axis in a conversion fails on shape.
# CLIP-L is OpenAI's (quick GELU), CLIP-G LAION's bigG (GELU), as in the published configs.
CLIP_L = dict(
    hidden_size=16,
    num_attention_heads=2,
    intermediate_size=40,
    projection_dim=12,
    hidden_act="quick_gelu",
)
CLIP_G = dict(
    hidden_size=24,
    num_attention_heads=3,
    intermediate_size=56,
    projection_dim=20,
    hidden_act="gelu",
)
T5 = dict(d_model=48, d_kv=8, num_heads=4, d_ff=64, num_layers=2)  # inner 32 != d_model
SD3 = dict(
    sample_size=8,  # default latent size: 8 x 8 latents, 16 x 16 images
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=T5["d_model"],
    caption_projection_dim=16,  # heads * head_dim
    pooled_projection_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"],
    pos_embed_max_size=16,  # latents up to 32 x 32; 8 x 8 latents crop the table
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)
DIT = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=8,  # learned sigma
    num_layers=2,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=1000,  # DiTPipeline's null class is 1000, hard-coded
)
CLIP_MAX_LENGTH = 77


def _perturb(module, gen, scale: float = 0.05) -> None:
    """Adds scale * N(0, 1) to every parameter: zero-initialised adaLN and output layers
    would otherwise make the denoisers output zeros, and unit norms hide a missing scale."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@contextlib.contextmanager
def _seeded(seed: int):
    """torch's global RNG (used by module init) seeded, and restored afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed + 1)


# ----------------------------------------------------------------------------- tokenizers


def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocab and merges in CLIP's layout: characters, characters + "</w>", one
    merge chain per word of WORDS, then <|startoftext|> and <|endoftext|> (the highest id,
    as 49407 is, so argmax pooling finds it). "!" is id 0 as in CLIP's byte order."""
    chars = ["!", ",", "."] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789")
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        toks = list(word[:-1]) + [word[-1] + "</w>"]
        while len(toks) > 1:
            pair = (toks[0], toks[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            toks = [pair[0] + pair[1]] + toks[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def write_clip_files(folder: str) -> None:
    """vocab.json and merges.txt, the files of a published CLIP tokenizer folder."""
    vocab, merges = clip_vocab()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def make_clip_tokenizer(folder: str, pad_token: str = "<|endoftext|>"):
    """CLIPTokenizer read from vocab.json + merges.txt written into folder."""
    from transformers import CLIPTokenizer

    write_clip_files(folder)
    return CLIPTokenizer.from_pretrained(
        folder, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH, local_files_only=True
    )


def make_t5_tokenizer():
    """A T5 Unigram tokenizer: <pad> 0, </s> 1, <unk> 2, "▁", whole words "▁w", then
    single characters of both cases; "</s>" appended to every sequence."""
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    chars += [c.upper() for c in chars] + list("0123456789,.!")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -4.0) for w in WORDS]
    pieces += [(c, -8.0) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


# ----------------------------------------------------------------------------- models


def _clip_model(sizes: dict, vocab_size: int, projection: bool = True):
    import transformers as tf

    cfg = tf.CLIPTextConfig(
        vocab_size=vocab_size,
        num_hidden_layers=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=0,
        eos_token_id=2,  # the published configs' legacy value: pool at argmax(ids)
        pad_token_id=1,
        **sizes,
    )
    cls = tf.CLIPTextModelWithProjection if projection else tf.CLIPTextModel
    return cls(cfg).eval()


def _t5_model(vocab_size: int):
    import transformers as tf

    cfg = tf.T5Config(
        vocab_size=vocab_size,
        feed_forward_proj="gated-gelu",  # T5 v1.1: gelu_new(wi_0 x) * wi_1 x
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        **T5,
    )
    return tf.T5EncoderModel(cfg).eval()


def _vae(latent_channels: int, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **kw,
    ).eval()


def make_sd3_pipeline(folder: str, *, seed: int = 0, with_t5: bool = True):
    """A tiny StableDiffusion3Pipeline (SD3.5 layout), saved to folder; the pipeline.

    The folder holds model_index.json, transformer/, vae/, text_encoder{,_2,_3}/ (config.json
    + model.safetensors), tokenizer{,_2}/ (vocab.json, merges.txt, tokenizer_config.json),
    tokenizer_3/ (tokenizer.json) and scheduler/ (FlowMatchEulerDiscreteScheduler, shift 3).
    Without T5 the pipeline has no text_encoder_3 / tokenizer_3 and uses zeros for them;
    model_index.json then says [null, null] for both, which diffusers counts as missing:
    reload with ``from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)``.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    with tempfile.TemporaryDirectory() as scratch:
        tok_l = make_clip_tokenizer(scratch)
        tok_g = make_clip_tokenizer(scratch, pad_token="!")
    tok_t5 = make_t5_tokenizer() if with_t5 else None
    with _seeded(seed) as gen:
        transformer = SD3Transformer2DModel(**SD3).eval()
        vae = _vae(
            16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            latents_mean=None,
            latents_std=None,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        clip_l = _clip_model(CLIP_L, len(tok_l))
        clip_g = _clip_model(CLIP_G, len(tok_g))
        # Published T5s have more rows than tokens (32128 > 32100).
        t5 = _t5_model(len(tok_t5) + 7) if with_t5 else None
        for m in (transformer, vae, clip_l, clip_g, t5):
            if m is not None:
                _perturb(m, gen)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=tok_l,
        text_encoder_2=clip_g,
        tokenizer_2=tok_g,
        text_encoder_3=t5,
        tokenizer_3=tok_t5,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    # Published CLIP tokenizer folders have vocab.json + merges.txt, no tokenizer.json.
    for sub in ("tokenizer", "tokenizer_2"):
        os.remove(os.path.join(folder, sub, "tokenizer.json"))
        write_clip_files(os.path.join(folder, sub))
    return pipe


def make_dit_pipeline(folder: str, *, seed: int = 0):
    """A tiny DiTPipeline with learned sigma, saved to folder; the pipeline.

    As in converted DiT checkpoints, every block holds a copy of block 0's timestep and
    class embedder (diffusers gives each block its own; the model uses only block 0's for
    the final layer). The scheduler is DDIM with DiT's published settings.
    """
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    with _seeded(seed) as gen:
        transformer = DiTTransformer2DModel(**DIT).eval()
        vae = _vae(4, scaling_factor=0.18215)
        for m in (transformer, vae):
            _perturb(m, gen)
    emb0 = transformer.transformer_blocks[0].norm1.emb.state_dict()
    for block in transformer.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(emb0)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe


def dit_state_dict(transformer) -> dict:
    """The diffusers DiT's tensors in the original facebookresearch/DiT key layout
    (the mapping of erg_jax/convert/dit.py, read backwards)."""
    import torch

    sd = {k: v.detach().clone().float() for k, v in transformer.state_dict().items()}
    emb = "transformer_blocks.0.norm1.emb"
    out = {}

    def put(dst: str, src: str) -> None:
        for s in ("weight", "bias"):
            out[f"{dst}.{s}"] = sd[f"{src}.{s}"]

    put("x_embedder.proj", "pos_embed.proj")
    out["pos_embed"] = transformer.pos_embed.pos_embed.detach().clone().float()  # (1, N, D)
    put("t_embedder.mlp.0", f"{emb}.timestep_embedder.linear_1")
    put("t_embedder.mlp.2", f"{emb}.timestep_embedder.linear_2")
    out["y_embedder.embedding_table.weight"] = sd[f"{emb}.class_embedder.embedding_table.weight"]
    for i in range(transformer.config.num_layers):
        src, dst = f"transformer_blocks.{i}", f"blocks.{i}"
        put(f"{dst}.adaLN_modulation.1", f"{src}.norm1.linear")
        for s in ("weight", "bias"):
            qkv = [sd[f"{src}.attn1.to_{n}.{s}"] for n in "qkv"]
            out[f"{dst}.attn.qkv.{s}"] = torch.cat(qkv, dim=0)  # (3D, D): q, k, v rows
        put(f"{dst}.attn.proj", f"{src}.attn1.to_out.0")
        put(f"{dst}.mlp.fc1", f"{src}.ff.net.0.proj")
        put(f"{dst}.mlp.fc2", f"{src}.ff.net.2")
    put("final_layer.adaLN_modulation.1", "proj_out_1")
    put("final_layer.linear", "proj_out_2")
    return out


def write_dit_pt(path: str, transformer) -> dict:
    """Writes the transformer as an original DiT ``.pt`` file (a bare state dict, as
    DiT-XL-2-256.pt is); returns that state dict."""
    import torch

    sd = dit_state_dict(transformer)
    torch.save(sd, path)
    return sd


# ----------------------------------------------------------------------------- runs


def _latents(latents_nchw):
    import torch

    return torch.from_numpy(np.ascontiguousarray(latents_nchw, dtype=np.float32))


def run_sd3(
    pipe,
    prompts: Sequence[str],
    latents_nchw: np.ndarray,
    *,
    steps: int = 3,
    guidance_scale: float = 4.0,
    negative_prompts: Sequence[str] | None = None,
    max_sequence_length: int = 16,
) -> np.ndarray:
    """diffusers' SD3 sampling from latents (b, 16, h, w); images (b, H, W, 3) in [0, 1].

    guidance_scale <= 1 runs without CFG; with CFG and no negative prompts the
    negatives are "" (the pipeline's default).
    """
    import torch

    latents = _latents(latents_nchw)
    scale = pipe.vae_scale_factor
    with torch.no_grad():
        out = pipe(
            prompt=list(prompts),
            negative_prompt=None if negative_prompts is None else list(negative_prompts),
            height=latents.shape[2] * scale,
            width=latents.shape[3] * scale,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            latents=latents,
            output_type="np",
            max_sequence_length=max_sequence_length,
        )
    return np.asarray(out.images, np.float32)


def run_dit(
    pipe,
    class_labels: Sequence[int],
    latents_nchw: np.ndarray,
    *,
    steps: int = 3,
    guidance_scale: float = 4.0,
) -> np.ndarray:
    """diffusers' DiT sampling from latents (b, 4, s, s); images (b, H, W, 3) in [0, 1].

    DiTPipeline.__call__ has no latents argument: it draws them with the module-level
    randn_tensor, so we patch that name in its module for the call to return ours.
    """
    import torch
    from diffusers.pipelines.dit import pipeline_dit

    latents = _latents(latents_nchw)

    def given(shape, **_):
        if tuple(shape) != tuple(latents.shape):
            raise ValueError(f"DiTPipeline wants latents {tuple(shape)}, got {latents.shape}")
        return latents.clone()

    with mock.patch.object(pipeline_dit, "randn_tensor", given), torch.no_grad():
        out = pipe(
            class_labels=list(class_labels),
            guidance_scale=guidance_scale,
            num_inference_steps=steps,
            output_type="np",
        )
    return np.asarray(out.images, np.float32)
