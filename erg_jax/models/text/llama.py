"""Llama decoder as a text encoder (Touvron et al., 2023; Llama 3, Dubey et al., 2024).

Pre-norm causal blocks: ``x = x + Attn(RMSNorm(x)); x = x + W_down(silu(W_gate x) * W_up x)``
(SwiGLU), grouped-query attention with rotary position embeddings (RoPE, Su et al.,
2021; the Llama 3 frequency scaling when the config asks for it). LLM-conditioned
text-to-image models take the hidden states of a chosen layer. C-ERG tempers the logits,
``tau_c * q.k / sqrt(d)`` after RoPE, under the causal and padding mask.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from erg_jax.energy import Energy
from erg_jax.models.text import layers as L
from erg_jax.weights import StateDict, linear, strip_prefix

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture fields of a transformers LlamaConfig."""

    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    eps: float = 1e-5
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 500000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192
    max_positions: int = 131072


def make_config(hf: dict, tensors: dict[str, np.ndarray] | None = None) -> LlamaConfig:
    """Config of a Llama folder: old (``rope_scaling``) and new (``rope_parameters``) forms."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported Llama rope_type '{kind}'; supported: {ROPE_TYPES}")
    heads = hf["num_attention_heads"]
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        eps=hf.get("rms_norm_eps", 1e-6),
        hidden_act=hf.get("hidden_act", "silu"),
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        rope_type=kind,
        rope_factor=rope.get("factor", 1.0),
        low_freq_factor=rope.get("low_freq_factor", 1.0),
        high_freq_factor=rope.get("high_freq_factor", 4.0),
        original_max_positions=rope.get(
            "original_max_position_embeddings", hf.get("max_position_embeddings", 8192)
        ),
        max_positions=hf.get("max_position_embeddings", 131072),
    )


def inverse_frequencies(c: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies (head_dim / 2,) in float32, with the config's scaling.

    Llama 3 divides the low frequencies (wavelength above original_max / low_freq_factor)
    by ``factor``, keeps the high ones (below original_max / high_freq_factor), and
    blends linearly in 1 / wavelength between.
    """
    d = c.head_dim
    inv = np.float32(1.0) / (
        np.float32(c.rope_theta) ** (np.arange(0, d, 2).astype(np.float32) / np.float32(d))
    )
    if c.rope_type == "linear":
        return inv / np.float32(c.rope_factor)
    if c.rope_type != "llama3":
        return inv
    low_wavelen = c.original_max_positions / c.low_freq_factor
    high_wavelen = c.original_max_positions / c.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / np.float32(c.rope_factor), inv)
    smooth = (c.original_max_positions / wavelen - c.low_freq_factor) / (
        c.high_freq_factor - c.low_freq_factor
    )
    blended = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def rotary(c: LlamaConfig, n: int, dtype):
    """The RoPE map for positions 0..n-1 on (b, n, h, head_dim) arrays (rotate-half form)."""
    freqs = np.arange(n, dtype=np.float32)[:, None] * inverse_frequencies(c)[None]
    angles = np.concatenate([freqs, freqs], axis=-1)
    cos = jnp.asarray(np.cos(angles), dtype)[None, :, None]
    sin = jnp.asarray(np.sin(angles), dtype)[None, :, None]

    def apply(x):
        x1, x2 = jnp.split(x, 2, axis=-1)
        return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin

    return apply


class LlamaLayer(nn.Module):
    """One pre-norm Llama decoder block, run without a cache."""

    config: LlamaConfig
    dtype: L.Dtype = jnp.float32
    param_dtype: L.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, energy: Energy, mask, rope):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = L.RMSNorm(c.eps, name="attn_norm", **kw)(x)
        attn = L.SelfAttention(
            c.num_heads,
            c.head_dim,
            c.num_kv_heads,
            qkv_bias=c.attention_bias,
            out_bias=c.attention_bias,
            name="attn",
            **kw,
        )
        x = x + attn(h, energy, mask=mask, rope=rope)
        h = L.RMSNorm(c.eps, name="mlp_norm", **kw)(x)
        f, b = c.intermediate_size, c.mlp_bias
        gate = L.dense(f, ("embed", "mlp"), bias=b, name="mlp_gate", **kw)(h)
        up = L.dense(f, ("embed", "mlp"), bias=b, name="mlp_in", **kw)(h)
        down = L.dense(c.hidden_size, ("mlp", "embed"), bias=b, name="mlp_out", **kw)
        return x + down(L.activation(c.hidden_act)(gate) * up)


class Llama(nn.Module):
    """Llama stack returning the last (final-normed) and a chosen layer's hidden states."""

    config: LlamaConfig
    dtype: L.Dtype = jnp.float32
    param_dtype: L.Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, ids, mask, energy: Energy, *, hidden_layer: int = -1, norm_hidden: bool = False
    ) -> dict:
        """Args: ids (b, n) int, right-padded; mask (b, n) or None. Returns
        last_hidden_state and hidden_state (b, n, hidden_size); no pooled output."""
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = ids.shape[1]
        x = L.embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), name="embed", **kw)(ids)
        rope = rotary(c, n, self.dtype)
        energies = L.layer_energies(energy, c.num_layers)
        m = L.attention_mask(mask, n, causal=True)
        hidden = [x]
        for i in range(c.num_layers):
            x = LlamaLayer(c, name=f"layers_{i}", **kw)(x, L.energy_at(energies, i), m, rope)
            hidden.append(x)
        final_norm = L.RMSNorm(c.eps, name="final_norm", **kw)
        return L.select_outputs(hidden, final_norm, hidden_layer, norm_hidden, last_is_normed=True)


def convert(tensors: dict[str, np.ndarray], c: LlamaConfig, source: str) -> dict:
    """Flax params of ``Llama`` from a LlamaModel or LlamaForCausalLM state dict."""
    drop = lambda k: k == "lm_head.weight" or k.endswith("rotary_emb.inv_freq")
    sd = StateDict(strip_prefix(tensors, "model.", drop), source)
    d, f = c.hidden_size, c.intermediate_size
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    p = {"embed": {"embedding": sd.take("embed_tokens.weight", (c.vocab_size, d))}}
    for i in range(c.num_layers):
        pre = f"layers.{i}"
        att, bias = f"{pre}.self_attn", c.attention_bias
        p[f"layers_{i}"] = {
            "attn_norm": {"scale": sd.take(f"{pre}.input_layernorm.weight", (d,))},
            "attn": {
                "q": linear(sd, f"{att}.q_proj", d, q_dim, bias),
                "k": linear(sd, f"{att}.k_proj", d, kv_dim, bias),
                "v": linear(sd, f"{att}.v_proj", d, kv_dim, bias),
                "o": linear(sd, f"{att}.o_proj", q_dim, d, bias),
            },
            "mlp_norm": {"scale": sd.take(f"{pre}.post_attention_layernorm.weight", (d,))},
            "mlp_gate": linear(sd, f"{pre}.mlp.gate_proj", d, f, c.mlp_bias),
            "mlp_in": linear(sd, f"{pre}.mlp.up_proj", d, f, c.mlp_bias),
            "mlp_out": linear(sd, f"{pre}.mlp.down_proj", f, d, c.mlp_bias),
        }
    p["final_norm"] = {"scale": sd.take("norm.weight", (d,))}
    sd.finish()
    return p
