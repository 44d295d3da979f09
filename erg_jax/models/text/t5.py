"""T5 encoder (Raffel et al., 2020): v1.0 (ReLU MLP), v1.1 / Flan (gated-GELU MLP), and
umT5 (Chung et al., 2023, "UniMax"), the text encoder of Wan 2.1 / 2.2.

Pre-norm blocks with RMSNorm and no biases; attention logits have no 1/sqrt(d) and add
a bucketed relative position bias B. T5 shares one bias table among all layers (it lives
in layer 0 of the checkpoint); umT5 gives every layer a table of its own and is otherwise
the same network. C-ERG tempers the whole logit, ``tau_c * (q.k + B)``, as
docs/METHOD.md's ``tau * (beta * Q K^T + B)`` with beta = 1; masked keys stay masked.
transformers' fp16 clamp of the residual stream is not reproduced (we run in fp32/bf16).

``wan_prompt_embeds`` is the Wan pipelines' prompt embedding: umT5's last hidden state
with the rows past each prompt's length set to zero.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from erg_jax.conditioning import clean_prompt
from erg_jax.energy import Energy
from erg_jax.models.text import layers as L
from erg_jax.weights import StateDict, embedding, linear

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture fields of a transformers T5Config (encoder side)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    gated: bool = False
    act: str = "relu"
    bias_per_layer: bool = False  # umT5: a relative bias table in every layer


def make_config(hf: dict, tensors: dict[str, np.ndarray] | None = None) -> T5Config:
    """Config of a T5 / umT5 encoder or full model folder; parses ``feed_forward_proj``."""
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"unsupported T5 feed_forward_proj '{proj}'")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    L.activation(act)
    return T5Config(
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        d_kv=hf["d_kv"],
        d_ff=hf["d_ff"],
        num_layers=hf["num_layers"],
        num_heads=hf["num_heads"],
        num_buckets=hf.get("relative_attention_num_buckets", 32),
        max_distance=hf.get("relative_attention_max_distance", 128),
        eps=hf.get("layer_norm_epsilon", 1e-6),
        gated=parts[0] == "gated",
        act=act,
        bias_per_layer=hf.get("model_type") == "umt5",
    )


def relative_buckets(n: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional bucket of every (query i, key j) offset j - i, (n, n) int32.

    Half the buckets hold positive offsets; of each half, the first half are exact
    offsets and the rest grow logarithmically up to max_distance. Computed in float32 as
    Mesh TensorFlow and transformers do, so the bucket edges agree.
    """
    rel = np.arange(n)[None, :] - np.arange(n)[:, None]
    half = num_buckets // 2
    out = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    exact = half // 2
    ratio = np.maximum(rel, 1).astype(np.float32) / np.float32(exact)
    scale = np.float32(math.log(max_distance / exact))
    large = exact + (np.log(ratio) / scale * np.float32(half - exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (out + np.where(rel < exact, rel, large)).astype(np.int32)


def bias_table(module: nn.Module, c: T5Config) -> jnp.ndarray:
    """The module's 'relative_bias' parameter, (num_buckets, h)."""
    init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("buckets", "heads"))
    return module.param("relative_bias", init, (c.num_buckets, c.num_heads), module.param_dtype)


def position_bias(table: jnp.ndarray, buckets: np.ndarray) -> jnp.ndarray:
    """Bias (1, h, n, n) of a (num_buckets, h) table at the (n, n) buckets."""
    return jnp.transpose(jnp.take(table, buckets, axis=0), (2, 0, 1))[None]


class T5Layer(nn.Module):
    """One pre-norm T5 encoder block; with ``bias_per_layer`` it owns its bias table."""

    config: T5Config
    dtype: L.Dtype = jnp.float32
    param_dtype: L.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, energy: Energy, mask, bias, buckets):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if c.bias_per_layer:
            bias = position_bias(bias_table(self, c), buckets)
        h = L.RMSNorm(c.eps, name="attn_norm", **kw)(x)
        attn = L.SelfAttention(
            c.num_heads, c.d_kv, qkv_bias=False, out_bias=False, scale=1.0, name="attn", **kw
        )
        x = x + attn(h, energy, mask=mask, bias=bias)
        h = L.RMSNorm(c.eps, name="mlp_norm", **kw)(x)
        act = L.activation(c.act)
        up = L.dense(c.d_ff, ("embed", "mlp"), bias=False, name="mlp_in", **kw)(h)
        if c.gated:
            up = act(L.dense(c.d_ff, ("embed", "mlp"), bias=False, name="mlp_gate", **kw)(h)) * up
        else:
            up = act(up)
        return x + L.dense(c.d_model, ("mlp", "embed"), bias=False, name="mlp_out", **kw)(up)


class T5Encoder(nn.Module):
    """T5 encoder stack returning the last (final-normed) and a chosen layer's states."""

    config: T5Config
    dtype: L.Dtype = jnp.float32
    param_dtype: L.Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, ids, mask, energy: Energy, *, hidden_layer: int = -1, norm_hidden: bool = False
    ) -> dict:
        """Args: ids (b, n) int; mask (b, n) or None. Returns last_hidden_state and
        hidden_state (b, n, d_model); T5 has no pooled output."""
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = ids.shape[1]
        x = L.embed(c.vocab_size, c.d_model, ("vocab", "embed"), name="embed", **kw)(ids)
        buckets = relative_buckets(n, c.num_buckets, c.max_distance)
        bias = None if c.bias_per_layer else position_bias(bias_table(self, c), buckets)
        energies = L.layer_energies(energy, c.num_layers)
        m = L.attention_mask(mask, n, causal=False)
        hidden = [x]
        for i in range(c.num_layers):
            layer = T5Layer(c, name=f"layers_{i}", **kw)
            x = layer(x, L.energy_at(energies, i), m, bias, buckets)
            hidden.append(x)
        final_norm = L.RMSNorm(c.eps, name="final_norm", **kw)
        return L.select_outputs(hidden, final_norm, hidden_layer, norm_hidden, last_is_normed=True)


def convert(tensors: dict[str, np.ndarray], c: T5Config, source: str) -> dict:
    """Flax params of ``T5Encoder`` from a (U)MT5EncoderModel or full (U)MT5 state dict."""
    keep = {k: v for k, v in tensors.items() if not k.startswith(("decoder.", "lm_head."))}
    sd = StateDict(keep, source)
    d, inner = c.d_model, c.num_heads * c.d_kv
    table = "shared" if sd.has("shared.weight") else "encoder.embed_tokens"
    p = {"embed": embedding(sd, table, c.vocab_size, d)}
    sd.skip("encoder.embed_tokens.weight")
    rel = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
    if not c.bias_per_layer:
        p["relative_bias"] = sd.take(rel.format(0), (c.num_buckets, c.num_heads))
    for i in range(c.num_layers):
        att = f"encoder.block.{i}.layer.0"
        ff = f"encoder.block.{i}.layer.1"
        mlp = {
            "mlp_norm": {"scale": sd.take(f"{ff}.layer_norm.weight", (d,))},
            "mlp_out": linear(sd, f"{ff}.DenseReluDense.wo", c.d_ff, d, False),
        }
        if c.gated:
            mlp["mlp_gate"] = linear(sd, f"{ff}.DenseReluDense.wi_0", d, c.d_ff, False)
            mlp["mlp_in"] = linear(sd, f"{ff}.DenseReluDense.wi_1", d, c.d_ff, False)
        else:
            mlp["mlp_in"] = linear(sd, f"{ff}.DenseReluDense.wi", d, c.d_ff, False)
        p[f"layers_{i}"] = {
            "attn_norm": {"scale": sd.take(f"{att}.layer_norm.weight", (d,))},
            "attn": {
                name: linear(sd, f"{att}.SelfAttention.{name}", *dims, False)
                for name, dims in (
                    ("q", (d, inner)),
                    ("k", (d, inner)),
                    ("v", (d, inner)),
                    ("o", (inner, d)),
                )
            },
            **mlp,
        }
        if c.bias_per_layer:
            p[f"layers_{i}"]["relative_bias"] = sd.take(rel.format(i), (c.num_buckets, c.num_heads))
    p["final_norm"] = {"scale": sd.take("encoder.final_layer_norm.weight", (d,))}
    sd.finish()
    return p


WAN_MAX_LENGTH = 512  # tokens per prompt in diffusers' Wan pipelines


def zero_past_length(hidden: jax.Array, mask: np.ndarray) -> jax.Array:
    """Hidden states with every row at or past its prompt's token count set to zero.

    Args:
      hidden: (..., b, n, d) encoder states (a leading branch axis is allowed).
      mask: (b, n) attention mask; a prompt's token count is the sum of its row.
    """
    mask = np.asarray(mask)
    n = mask.shape[-1]
    keep = np.arange(n)[None, :] < mask.sum(-1)[:, None]  # (b, n)
    return jnp.where(keep[..., None], hidden, jnp.zeros((), hidden.dtype))


def wan_prompt_embeds(
    encoder: Any,
    prompts: str | Sequence[str],
    energy: Energy | Sequence[Energy] = Energy(),
    *,
    max_length: int = WAN_MAX_LENGTH,
    branches: bool = False,
) -> jax.Array:
    """The text condition of Wan 2.1 / 2.2: umT5's last hidden state, zero past each prompt.

    Follows diffusers' ``WanPipeline._get_t5_prompt_embeds``: the cleaned prompts are
    tokenized to max_length (end token added, right padding, truncation), encoded with
    their attention mask, and each prompt's rows from its token count on are set to 0.

    Args:
      encoder: a ``TextEncoder`` from ``load_text_encoder(text_encoder_dir,
        tokenizer=tokenizer_dir)`` of a Wan pipeline folder (any T5 works the same way).
      prompts: one prompt or b of them.
      energy: C-ERG's energy in the encoder's self-attention, as ``TextEncoder.encode``
        takes it; with ``branches``, energies with a leading branch axis (B,), as
        ``TextEncoder.encode_branches`` takes them.
      max_length: tokens per prompt (the pipelines' max_sequence_length, 512).
      branches: encode under the B energies in one vmapped call.

    Returns:
      (b, max_length, d_model), or (B, b, max_length, d_model) with ``branches``.
    """
    tok = encoder.tokenizer
    if tok is None:
        raise ValueError("wan_prompt_embeds needs an encoder loaded with its tokenizer")
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    texts = [clean_prompt(t) for t in texts]
    for text, ids in zip(texts, tok(texts, truncation=False)["input_ids"], strict=True):
        if len(ids) > max_length:
            logger.warning("prompt of %d tokens truncated to %d: %.60r", len(ids), max_length, text)
    out = tok(
        texts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="np",
    )
    ids, mask = out["input_ids"], out["attention_mask"]
    run = encoder.encode_branches if branches else encoder.encode
    return zero_past_length(run(ids, mask, energy)["last_hidden_state"], mask)
