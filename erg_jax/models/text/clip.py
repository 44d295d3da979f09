"""CLIP text encoder (Radford et al., 2021), with the text projection CLIP-G uses.

Pre-norm causal transformer over token + learned position embeddings:
``x = x + Attn(LN1(x)); x = x + MLP(LN2(x))``, final LayerNorm; logits
``tau_c * q.k / sqrt(d)`` under the causal (and padding) mask (C-ERG). The pooled output is
the final-normed state at the end token; CLIPTextModelWithProjection maps it through
``text_projection`` (no bias), which SDXL's and SD3's CLIP-G pooled embedding is.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from erg_jax.energy import Energy
from erg_jax.models.text import layers as L
from erg_jax.weights import StateDict, embedding, linear, norm


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
    """Architecture fields of a transformers CLIPTextConfig (+ the projection)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "quick_gelu"
    max_positions: int = 77
    eps: float = 1e-5
    eos_token_id: int = 2
    projection_dim: int | None = None


class ClipLayer(nn.Module):
    """One pre-norm CLIP block."""

    config: ClipTextConfig
    dtype: L.Dtype = jnp.float32
    param_dtype: L.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, energy: Energy, mask):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = L.layer_norm(c.eps, name="attn_norm", **kw)(x)
        x = x + L.SelfAttention(c.num_heads, c.hidden_size // c.num_heads, name="attn", **kw)(
            h, energy, mask=mask
        )
        h = L.layer_norm(c.eps, name="mlp_norm", **kw)(x)
        h = L.dense(c.intermediate_size, ("embed", "mlp"), bias=True, name="mlp_in", **kw)(h)
        h = L.activation(c.hidden_act)(h)
        return x + L.dense(c.hidden_size, ("mlp", "embed"), bias=True, name="mlp_out", **kw)(h)


class ClipText(nn.Module):
    """CLIP text transformer returning hidden states and the pooled (projected) output."""

    config: ClipTextConfig
    dtype: L.Dtype = jnp.float32
    param_dtype: L.Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, ids, mask, energy: Energy, *, hidden_layer: int = -1, norm_hidden: bool = False
    ) -> dict:
        """Args: ids (b, n) int with an end token in each row; mask (b, n) or None.

        Returns last_hidden_state, hidden_state (b, n, d) and pooled (b, d or
        projection_dim); with a projection also pooler_output (b, d), unprojected.
        """
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, n = ids.shape
        if n > c.max_positions:
            raise ValueError(f"CLIP takes at most {c.max_positions} tokens, got {n}")
        x = L.embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), name="token_embed", **kw)(ids)
        x = (
            x
            + L.embed(
                c.max_positions, c.hidden_size, ("positions", "embed"), name="pos_embed", **kw
            )(jnp.arange(n))[None]
        )
        energies = L.layer_energies(energy, c.num_layers)
        m = L.attention_mask(mask, n, causal=True)
        hidden = [x]
        for i in range(c.num_layers):
            x = ClipLayer(c, name=f"layers_{i}", **kw)(x, L.energy_at(energies, i), m)
            hidden.append(x)
        final_norm = L.layer_norm(c.eps, name="final_norm", **kw)
        out = L.select_outputs(hidden, final_norm, hidden_layer, norm_hidden, last_is_normed=False)
        # Configs from before transformers PR #24773 say eos_token_id = 2; there the end
        # token is the largest id of the row, as CLIP's own code takes it.
        end = jnp.argmax(ids if c.eos_token_id == 2 else ids == c.eos_token_id, axis=-1)
        pooled = out["last_hidden_state"][jnp.arange(b), end]
        if c.projection_dim is None:
            out["pooled"] = pooled
        else:
            proj = L.dense(c.projection_dim, ("embed", None), bias=False, name="projection", **kw)
            out["pooled"] = proj(pooled)
            out["pooler_output"] = pooled
        return out


def make_config(hf: dict, tensors: dict[str, np.ndarray]) -> ClipTextConfig:
    """Config of a CLIPTextModel(WithProjection) or full CLIPModel folder."""
    text = hf.get("text_config", hf) if hf.get("model_type") == "clip" else hf
    has_projection = "text_projection.weight" in tensors
    proj = hf.get("projection_dim", text.get("projection_dim", 512)) if has_projection else None
    return ClipTextConfig(
        vocab_size=text.get("vocab_size", 49408),
        hidden_size=text.get("hidden_size", 512),
        num_layers=text.get("num_hidden_layers", 12),
        num_heads=text.get("num_attention_heads", 8),
        intermediate_size=text.get("intermediate_size", 2048),
        hidden_act=text.get("hidden_act", "quick_gelu"),
        max_positions=text.get("max_position_embeddings", 77),
        eps=text.get("layer_norm_eps", 1e-5),
        eos_token_id=text.get("eos_token_id", 2),
        projection_dim=proj,
    )


def convert(tensors: dict[str, np.ndarray], c: ClipTextConfig, source: str) -> dict:
    """Flax params of ``ClipText`` from a CLIP state dict (its vision tower is ignored)."""
    # transformers >= 5 saves a bare CLIPTextModel without the text_model. prefix.
    prefixed = any(k.startswith("text_model.") for k in tensors)
    text = {
        k.removeprefix("text_model."): v
        for k, v in tensors.items()
        if not prefixed or k.startswith("text_model.") or k == "text_projection.weight"
    }
    sd = StateDict(text, source)
    sd.skip("embeddings.position_ids")
    d, f = c.hidden_size, c.intermediate_size
    p = {
        "token_embed": embedding(sd, "embeddings.token_embedding", c.vocab_size, d),
        "pos_embed": embedding(sd, "embeddings.position_embedding", c.max_positions, d),
        "final_norm": norm(sd, "final_layer_norm", d),
    }
    for i in range(c.num_layers):
        pre = f"encoder.layers.{i}"
        att = f"{pre}.self_attn"
        p[f"layers_{i}"] = {
            "attn_norm": norm(sd, f"{pre}.layer_norm1", d),
            "attn": {
                "q": linear(sd, f"{att}.q_proj", d, d, True),
                "k": linear(sd, f"{att}.k_proj", d, d, True),
                "v": linear(sd, f"{att}.v_proj", d, d, True),
                "o": linear(sd, f"{att}.out_proj", d, d, True),
            },
            "mlp_norm": norm(sd, f"{pre}.layer_norm2", d),
            "mlp_in": linear(sd, f"{pre}.mlp.fc1", d, f, True),
            "mlp_out": linear(sd, f"{pre}.mlp.fc2", f, d, True),
        }
    if c.projection_dim is not None:
        p["projection"] = linear(sd, "text_projection", d, c.projection_dim, False)
    sd.finish()
    return p
