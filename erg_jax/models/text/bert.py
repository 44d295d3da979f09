"""BERT text encoder (Devlin et al., 2019) as in MiniLM / sentence-transformers.

Post-norm blocks: ``x = LN(x + Attn(x)); x = LN(x + MLP(x))`` over word + position +
token-type embeddings, padding masked on the keys, logits ``tau_c * q.k / sqrt(d)``
(C-ERG). The pooled output is ``tanh(W h_[CLS] + b)`` when the checkpoint has a pooler.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from erg_jax.energy import Energy
from erg_jax.models.text import layers as L
from erg_jax.weights import StateDict, embedding, linear, norm, strip_prefix


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture fields of a transformers BertConfig."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    max_positions: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12
    pooler: bool = True

    @classmethod
    def from_hf(cls, cfg: dict, pooler: bool = True) -> BertConfig:
        kind = cfg.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(f"unsupported BERT position_embedding_type '{kind}' (absolute only)")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            hidden_act=cfg.get("hidden_act", "gelu"),
            max_positions=cfg.get("max_position_embeddings", 512),
            type_vocab_size=cfg.get("type_vocab_size", 2),
            eps=cfg.get("layer_norm_eps", 1e-12),
            pooler=pooler,
        )


class BertLayer(nn.Module):
    """One post-norm BERT block."""

    config: BertConfig
    dtype: L.Dtype = jnp.float32
    param_dtype: L.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, energy: Energy, mask):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = L.SelfAttention(c.num_heads, c.hidden_size // c.num_heads, name="attn", **kw)(
            x, energy, mask=mask
        )
        x = L.layer_norm(c.eps, name="attn_norm", **kw)(x + h)
        h = L.dense(c.intermediate_size, ("embed", "mlp"), bias=True, name="mlp_in", **kw)(x)
        h = L.activation(c.hidden_act)(h)
        h = L.dense(c.hidden_size, ("mlp", "embed"), bias=True, name="mlp_out", **kw)(h)
        return L.layer_norm(c.eps, name="mlp_norm", **kw)(x + h)


class Bert(nn.Module):
    """BERT encoder returning the last, a chosen layer's, and the pooled hidden states."""

    config: BertConfig
    dtype: L.Dtype = jnp.float32
    param_dtype: L.Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, ids, mask, energy: Energy, *, hidden_layer: int = -1, norm_hidden: bool = False
    ) -> dict:
        """Args: ids (b, n) int; mask (b, n) (1 = token) or None; energy per layer or
        shared (see ``layers.layer_energies``). Returns last_hidden_state and
        hidden_state (b, n, d), and pooled (b, d) when the model has a pooler."""
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = ids.shape[1]
        x = L.embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), name="word_embed", **kw)(ids)
        pos = L.embed(
            c.max_positions, c.hidden_size, ("positions", "embed"), name="pos_embed", **kw
        )(jnp.arange(n))
        types = L.embed(c.type_vocab_size, c.hidden_size, (None, "embed"), name="type_embed", **kw)(
            jnp.zeros((1, n), jnp.int32)
        )
        x = L.layer_norm(c.eps, name="embed_norm", **kw)(x + pos[None] + types)
        energies = L.layer_energies(energy, c.num_layers)
        m = L.attention_mask(mask, n, causal=False)
        hidden = [x]
        for i in range(c.num_layers):
            x = BertLayer(c, name=f"layers_{i}", **kw)(x, L.energy_at(energies, i), m)
            hidden.append(x)
        out = L.select_outputs(hidden, None, hidden_layer, norm_hidden, last_is_normed=False)
        if c.pooler:
            cls = out["last_hidden_state"][:, 0]
            out["pooled"] = jnp.tanh(
                L.dense(c.hidden_size, ("embed", None), bias=True, name="pooler", **kw)(cls)
            )
        return out


def convert(tensors: dict[str, np.ndarray], c: BertConfig, source: str) -> dict:
    """Flax params of ``Bert`` from a BertModel (or ``bert.``-prefixed) state dict."""
    sd = StateDict(strip_prefix(tensors, "bert."), source)
    sd.skip("embeddings.position_ids", "embeddings.token_type_ids")
    d, f = c.hidden_size, c.intermediate_size
    p = {
        "word_embed": embedding(sd, "embeddings.word_embeddings", c.vocab_size, d),
        "pos_embed": embedding(sd, "embeddings.position_embeddings", c.max_positions, d),
        "type_embed": embedding(sd, "embeddings.token_type_embeddings", c.type_vocab_size, d),
        "embed_norm": norm(sd, "embeddings.LayerNorm", d),
    }
    for i in range(c.num_layers):
        pre = f"encoder.layer.{i}"
        att = f"{pre}.attention"
        p[f"layers_{i}"] = {
            "attn": {
                "q": linear(sd, f"{att}.self.query", d, d, True),
                "k": linear(sd, f"{att}.self.key", d, d, True),
                "v": linear(sd, f"{att}.self.value", d, d, True),
                "o": linear(sd, f"{att}.output.dense", d, d, True),
            },
            "attn_norm": norm(sd, f"{att}.output.LayerNorm", d),
            "mlp_in": linear(sd, f"{pre}.intermediate.dense", d, f, True),
            "mlp_out": linear(sd, f"{pre}.output.dense", f, d, True),
            "mlp_norm": norm(sd, f"{pre}.output.LayerNorm", d),
        }
    if c.pooler:
        p["pooler"] = linear(sd, "pooler.dense", d, d, True)
    sd.finish()
    return p


def make_config(hf: dict, tensors: dict[str, np.ndarray]) -> BertConfig:
    """The config of a folder; the pooler exists when the checkpoint holds it."""
    return BertConfig.from_hf(hf, pooler=any(k.endswith("pooler.dense.weight") for k in tensors))
