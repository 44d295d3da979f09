"""Pieces shared by the text encoders: dense layers with logical axes, norms, masks,
per-layer energies, and the self-attention that carries C-ERG's temperature.

C-ERG (Berrada Ifriqi et al., 2025, Sec. 3.2) tempers the self-attention logits of the
text encoder, ``tau_c * (beta * Q K^T + B)``; every encoder here attends through
``erg_jax.energy.energy_attention`` with one Energy per layer, so tau_c = 1 is the plain
encoder bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from erg_jax.energy import Energy, attention_entropy, energy_attention

Array = jax.Array
Dtype = Any


def dense(
    features: int, axes: tuple[str, str], *, bias: bool, dtype: Dtype, param_dtype: Dtype, name: str
) -> nn.Dense:
    """A Dense whose kernel (in, out) and bias (out,) carry logical axis names."""
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
        name=name,
    )


def embed(
    num: int, features: int, axes: tuple[str, str], *, dtype: Dtype, param_dtype: Dtype, name: str
) -> nn.Embed:
    """An embedding table (num, features) with logical axis names."""
    return nn.Embed(
        num,
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
        name=name,
    )


def layer_norm(eps: float, *, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    """LayerNorm with mean and variance in float32, scale and bias on the 'embed' axis."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


class RMSNorm(nn.Module):
    """Root-mean-square norm without mean or bias (T5 and Llama): x / rms(x) * scale."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return jnp.asarray(scale, self.dtype) * y.astype(self.dtype)


def activation(name: str) -> Callable[[Array], Array]:
    """The Hugging Face activation of this name (exact or tanh gelu, quick gelu, ...)."""
    table = {
        "relu": jax.nn.relu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
    }
    if name not in table:
        raise ValueError(f"unsupported activation '{name}'; supported: {sorted(table)}")
    return table[name]


def attention_mask(mask: Array | None, n: int, causal: bool) -> Array | None:
    """Boolean (b or 1, 1, n, n) mask: key padding (b, n) and/or causal; None if neither."""
    out = None
    if mask is not None:
        out = jnp.asarray(mask).astype(bool)[:, None, None, :]
    if causal:
        tri = jnp.tril(jnp.ones((n, n), bool))[None, None]
        out = tri if out is None else out & tri
    return out


def layer_energies(energy: Energy | Sequence[Energy], num_layers: int) -> Energy:
    """One Energy per layer: fields (num_layers, ...) in float32.

    A scalar field is shared by all layers; a field with a leading axis of size
    ``num_layers`` is per layer (a per-head value for every layer is (num_layers, h));
    a list of Energies (one per layer) is stacked.

    Raises:
      ValueError: a field whose leading axis is not num_layers.
    """
    if isinstance(energy, Sequence) and not isinstance(energy, Energy):
        if len(energy) != num_layers:
            raise ValueError(f"got {len(energy)} energies for {num_layers} layers")
        return jax.tree_util.tree_map(
            lambda *xs: jnp.stack(jnp.broadcast_arrays(*[jnp.asarray(x, jnp.float32) for x in xs])),
            *energy,
        )
    if not isinstance(energy, Energy):
        raise ValueError(f"energy must be an erg_jax.Energy or a list of them, got {type(energy)}")

    def per_layer(name):
        x = jnp.asarray(getattr(energy, name), jnp.float32)
        if x.ndim == 0:
            return jnp.broadcast_to(x, (num_layers,))
        if x.shape[0] != num_layers:
            raise ValueError(
                f"energy.{name} has shape {tuple(x.shape)}: expected a scalar (all layers) "
                f"or a leading axis of {num_layers} (one value per layer)"
            )
        return x

    return Energy(per_layer("tau"), per_layer("alpha"), per_layer("gamma"))


def energy_at(energy: Energy, i: int) -> Energy:
    """Layer i's Energy from a per-layer stack."""
    return jax.tree_util.tree_map(lambda a: a[i], energy)


class SelfAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention through ``energy_attention``.

    Parameters 'q', 'k', 'v', 'o' are Dense layers on the flattened heads, so a
    checkpoint's (out, in) matrices map one to one. When the 'intermediates' collection
    is mutable the attention entropy of every query, (b, n, h), is sown as 'entropy'.
    """

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    qkv_bias: bool = True
    out_bias: bool = True
    scale: float | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Array,
        energy: Energy,
        *,
        mask: Array | None = None,
        bias: Array | None = None,
        rope: Callable[[Array], Array] | None = None,
    ) -> Array:
        """Args: x (b, n, d_model); energy of this layer; mask, bias broadcastable to
        (b, h, n, n); rope applied to q and k (b, n, h, d). Returns (b, n, d_model)."""
        b, n, d_model = x.shape
        hk = self.num_kv_heads or self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = dense(
            self.num_heads * self.head_dim, ("embed", "heads"), bias=self.qkv_bias, name="q", **kw
        )(x)
        k = dense(hk * self.head_dim, ("embed", "heads"), bias=self.qkv_bias, name="k", **kw)(x)
        v = dense(hk * self.head_dim, ("embed", "heads"), bias=self.qkv_bias, name="v", **kw)(x)
        q = q.reshape(b, n, self.num_heads, self.head_dim)
        k = k.reshape(b, n, hk, self.head_dim)
        v = v.reshape(b, n, hk, self.head_dim)
        if rope is not None:
            q, k = rope(q), rope(k)
        if self.is_mutable_collection("intermediates"):
            ent = attention_entropy(q, k, energy, bias=bias, mask=mask, scale=self.scale)
            self.sow("intermediates", "entropy", ent)
        out = energy_attention(q, k, v, energy, bias=bias, mask=mask, scale=self.scale)
        out = out.reshape(b, n, self.num_heads * self.head_dim)
        return dense(d_model, ("heads", "embed"), bias=self.out_bias, name="o", **kw)(out)


def select_outputs(
    hidden: list[Array],
    final_norm: Callable[[Array], Array] | None,
    hidden_layer: int,
    norm_hidden: bool,
    last_is_normed: bool,
) -> dict[str, Array]:
    """The last hidden state and the chosen layer's, indexed as transformers does.

    Args:
      hidden: num_layers + 1 states (b, n, d): the embeddings, then each layer's output.
      final_norm: the model's final norm, or None when it has none (BERT).
      hidden_layer: index into ``hidden`` (negative counts from the end), like
        ``hidden_states[k]`` of a transformers model.
      norm_hidden: apply the final norm to the chosen state too.
      last_is_normed: transformers' ``hidden_states[-1]`` is the normed output (T5,
        Llama), not the last layer's raw output (CLIP).
    """
    num = len(hidden)
    if not -num <= hidden_layer < num:
        raise ValueError(f"hidden_layer {hidden_layer} out of range for {num - 1} layers")
    k = hidden_layer % num
    norm = final_norm or (lambda h: h)
    last = norm(hidden[-1])
    chosen = hidden[k]
    if k == num - 1 and (last_is_normed or norm_hidden):
        chosen = last
    elif norm_hidden:
        chosen = norm(chosen)
    return {"last_hidden_state": last, "hidden_state": chosen}
