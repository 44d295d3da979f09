"""The Wan 2.1 / 2.2 text-to-video transformer (Wan Team 2025, "Wan: Open and Advanced
Large-Scale Video Generative Models") in Flax: channel-last video latents, a timestep and
umT5 text tokens -> the flow-matching velocity.

Laid out as diffusers' ``WanTransformer3DModel``, so its checkpoints convert key by key
(``erg_jax.convert.wan``):

    tokens = Conv3d(x) on (1, 2, 2) space-time patches       (b, N, D), N = F' H' W'
    temb   = MLP(sin-cos(t))                 (freq_dim -> D -> D, SiLU)
    temb6  = Linear(silu(temb))              (b, 6, D): every block's modulation, plus
                                              the block's own learnt table
    c      = MLP_gelu_tanh(context)          (b, L, D): all L text rows, no mask
    blocks (``wan_layers.Block``): modulated rotary self-attention, cross-attention to c,
           modulated GELU FFN
    out    = LN(h) (1 + scale) + shift, (shift, scale) = table + temb; Linear; unpatchify

Every block's self-attention runs under its attention control (``wan_layers``: SEG's
space-time query blur, I-ERG's energy and PAG / STG-A's identity in ``attend``, TPG, SLG /
STG-R's skip); the cross-attention is plain attention. NAG and EMAG-Q are not wired into
this model and are refused. Blocks are a Python loop or, with ``scan_blocks``, one
``nn.scan`` (params stacked under "blocks"), either rematerialisable. Guidance branches
that share their condition differ only from the first block a control perturbs; the
denoiser's ``branched`` runs the blocks before it once (``shared_prefix``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from erg_jax.control import AttentionControl, captured_map, probed_entropy
from erg_jax.models.mmdit_layers import dense, layer_norm, timestep_features
from erg_jax.models.shared_prefix import Layers, branched_layers
from erg_jax.models.wan_config import (  # noqa: F401  (re-exported)
    I2V_FIELDS,
    PRESETS,
    QK_NORMS,
    RECIPES,
    STG_TERMS,
    Spec,
    block_names,
    check_config,
    latent_shape,
    layout,
    stack_blocks,
    unstack_blocks,
    wan_config,
)
from erg_jax.models.wan_layers import (  # noqa: F401  (re-exported)
    Block,
    FeedForward,
    Grid,
    blur_queries_3d,
    maybe_blur_3d,
    tokens,
    wan_rope,
)

Array = jax.Array


class TimeEmbedder(nn.Module):
    """linear_2(silu(linear_1(features))), computed in float32 whatever the activation
    dtype (diffusers keeps ``time_embedder`` in float32)."""

    s: Spec

    @nn.compact
    def __call__(self, feats: Array) -> Array:
        s = dataclasses.replace(self.s, dtype=jnp.float32)
        h = nn.silu(dense(s, s.dim, (None, "mlp"), "linear_1")(feats.astype(jnp.float32)))
        return dense(s, s.dim, ("mlp", "embed"), "linear_2")(h)


class ConditionEmbedder(nn.Module):
    """The timestep and text embeddings (diffusers' WanTimeTextImageEmbedding, text only).

    Returns:
      temb (b, D) and temb6 (b, 6, D), rounded to the activation dtype as diffusers
      rounds them, and the embedded text (b, L, D).
    """

    s: Spec

    @nn.compact
    def __call__(self, t: Array, context: Array):
        s, d = self.s, self.s.dim
        temb = TimeEmbedder(s, name="time_embedder")(timestep_features(t, s.freq_dim))
        temb = temb.astype(s.dtype)
        temb6 = dense(s, 6 * d, ("embed", "mlp"), "time_proj")(nn.silu(temb))
        text = FeedForward(s, d, axes_in=None, name="text_embedder")(context.astype(s.dtype))
        return temb, temb6.reshape(t.shape[0], 6, d), text


class Wan(nn.Module):
    """The Wan transformer: (b, F, H, W, C) latents, timesteps, text -> velocity."""

    s: Spec

    def _blocks(self, h, c, temb6, rope, grid: Grid, attention):
        """Every block, a loop or one scan: tokens (b, N, D) -> tokens after the last."""
        s = self.s
        block = nn.remat(Block, prevent_cse=not s.scan) if s.remat else Block
        if s.scan:
            run = nn.scan(
                block,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=s.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            return run(s, grid, name="blocks")(h, c, temb6, rope, attention)[0]
        for i, name in enumerate(block_names(s.num_layers)):
            control = None if attention is None else attention.layer(i)
            h, _ = block(s, grid, name=name)(h, c, temb6, rope, control)
        return h

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        context: Array,
        attention: AttentionControl | None = None,
        blocks: Callable | None = None,
    ) -> Array:
        """Velocity prediction.

        Args:
          x: (b, F, H, W, in_channels) latents, F, H, W multiples of the patch sides.
          t: (b,) timesteps, 1000 * sigma (diffusers' pipelines pass them as integers).
          context: (b, L, text_dim) umT5 tokens, padded rows included.
          attention: AttentionControl with one entry per block, or None.
          blocks: replaces the blocks (``branched``): ``blocks(h, c, temb6, rope) -> h``
            from the embedded tokens h (b, N, D), the text c (b, L, D), the modulation
            temb6 (b, 6, D) and the rotary tables to the tokens after the last block,
            (..., b, N, D) with leading (branch) axes, which the output keeps.

        Returns:
          (..., b, F, H, W, out_channels) in the activation dtype.
        """
        s, d, patch = self.s, self.s.dim, self.s.patch
        b, *size, _ = x.shape
        if len(size) != 3 or any(n % p for n, p in zip(size, patch, strict=True)):
            raise ValueError(
                f"latents must be (b, frames, height, width, channels) with sizes multiple "
                f"of patch_size={patch}, got {x.shape}"
            )
        grid = tuple(n // p for n, p in zip(size, patch, strict=True))
        if max(grid) > s.rope_max:
            raise ValueError(
                f"token grid {grid} exceeds rope_max_seq_len={s.rope_max} positions an axis"
            )
        if attention is not None:
            if attention.num_layers not in (0, s.num_layers):
                raise ValueError(
                    f"attention control has {attention.num_layers} layers, the model {s.num_layers}"
                )
            if attention.nag is not None or attention.emag is not None:
                raise ValueError("the Wan transformer does not implement NAG or EMAG-Q controls")
        h = nn.Conv(
            d,
            patch,
            strides=patch,
            padding="VALID",
            dtype=s.dtype,
            param_dtype=s.param_dtype,
            precision=s.precision,
            name="patch_embedding",
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, None, "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        )(x.astype(s.dtype))
        h = tokens(h.reshape(b, -1, d))
        temb, temb6, c = ConditionEmbedder(s, name="condition_embedder")(t, context)
        rope = wan_rope(grid, s.rope_axes)
        if blocks is None:
            h = self._blocks(h, c, temb6, rope, grid, attention)
        else:
            h = blocks(h, c, temb6, rope)
        h = tokens(h)

        init = nn.initializers.normal(d**-0.5)  # diffusers' randn / sqrt(dim)
        table = self.param(
            "scale_shift_table",
            nn.with_logical_partitioning(init, (None, "embed")),
            (2, d),
            s.param_dtype,
        )
        m = table.astype(jnp.float32)[None] + temb.astype(jnp.float32)[:, None]
        shift, scale = m[:, :1], m[:, 1:]
        h = (layer_norm(h.astype(jnp.float32), s.eps) * (1 + scale) + shift).astype(s.dtype)
        h = dense(s, math.prod(patch) * s.out_channels, ("embed", None), "proj_out")(h)
        return unpatchify(h, grid, patch)


def unpatchify(h: Array, grid: Grid, patch: tuple[int, int, int]) -> Array:
    """(..., N, pt*ph*pw*C) tokens, channels in (pt, ph, pw, C) order -> (..., F, H, W, C)."""
    lead, k = h.shape[:-2], h.ndim - 2
    h = h.reshape(lead + grid + patch + (-1,))
    h = h.transpose(tuple(range(k)) + tuple(k + a for a in (0, 3, 1, 4, 2, 5, 6)))
    return h.reshape(lead + tuple(g * p for g, p in zip(grid, patch, strict=True)) + (-1,))


def wan_module(config: dict) -> Wan:
    """The Flax module a config dict describes."""
    return Wan(Spec.from_config(config))


def _init_module(config: dict) -> Wan:
    """The module its params are made with: one token through plain attention, whatever
    the config's (ring or Ulysses attention under a job's mesh would compile a sharded
    program for the same shapes; an attention implementation holds no params)."""
    return wan_module(dict(config, attention_implementation="einsum"))


def _dummy_inputs(config: dict):
    x = jnp.zeros((1, *config["patch_size"], int(config["in_channels"])), jnp.float32)
    context = jnp.zeros((1, 1, int(config["text_dim"])), jnp.float32)
    return x, jnp.zeros((1,), jnp.float32), context


def init_params(config: dict, rng: Array) -> dict:
    """Random params (for tests), unboxed."""
    return nn.meta.unbox(_init_module(config).init(rng, *_dummy_inputs(config))["params"])


def abstract_params(config: dict) -> dict:
    """The params' shapes and dtypes (jax.ShapeDtypeStruct), without allocating them."""
    return jax.eval_shape(lambda rng: init_params(config, rng), jax.random.key(0))


def param_axes(config: dict) -> dict:
    """The logical axis names (jax.sharding.PartitionSpec) of every param."""
    boxed = jax.eval_shape(_init_module(config).init, jax.random.key(0), *_dummy_inputs(config))
    return nn.get_partition_spec(boxed)["params"]


def count_params(config: dict) -> int:
    """Number of parameters, from shapes alone (the scanned layout, which traces one
    block however deep the model). The rotary tables are not parameters."""
    leaves = jax.tree_util.tree_leaves(abstract_params(dict(config, scan_blocks=True)))
    return sum(math.prod(a.shape) for a in leaves)


def make_denoiser(config: dict, params: Any):
    """``denoiser(x, t, cond, attention=None) -> velocity`` (docs/INTERFACES.md).

    x (b, F, H, W, C) channel-last latents (F latent frames); t (b,) or scalar, the
    model's timestep 1000 * sigma (as floats: rounding them to integers, as diffusers'
    pipelines do, is the caller's choice); cond a dict with 'context' (b, L, text_dim),
    the umT5 tokens with their padded rows; attention an AttentionControl with
    ``num_layers`` entries or None. The velocity is returned in float32, shaped like x
    with out_channels channels.

    The function also carries ``branched``, ``with_attention_map``, ``with_entropy``,
    ``config``, ``params``, ``num_layers`` and ``layout``.
    """
    module = wan_module(config)  # check_config: a config of another kind is refused
    s = module.s

    def inputs(x: Array, t: Array, cond: dict) -> tuple[Array, Array]:
        if "context" not in cond:
            raise ValueError(f"Wan cond needs 'context' (b, L, text_dim), got keys {sorted(cond)}")
        return jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],)), cond["context"]

    def denoiser(x: Array, t: Array, cond: dict, attention: AttentionControl | None = None):
        out = module.apply({"params": params}, x, *inputs(x, t, cond), attention)
        return out.astype(jnp.float32)

    def branched(x: Array, t: Array, cond: dict, controls: AttentionControl | None) -> Array:
        """Outputs (B, b, F, H, W, out) of B branches sharing x, t and cond, differing only
        in their stacked controls (leaves (B, L); None: B = 1); the blocks before the first
        one a control perturbs run once (``erg_jax.models.shared_prefix``)."""
        grid = tuple(n // p for n, p in zip(x.shape[1:4], s.patch, strict=True))

        def blocks(h, c, temb6, rope):
            blk = Block(s, grid, parent=None)
            apply = lambda q, st, ctl: blk.apply({"params": q}, st, c, temb6, rope, ctl)[0]
            layers = params["blocks"] if s.scan else [params[n] for n in block_names(s.num_layers)]
            return branched_layers(h, [Layers(apply, layers, stacked=s.scan)], controls)

        out = module.apply({"params": params}, x, *inputs(x, t, cond), blocks=blocks)
        return out.astype(jnp.float32)

    def sowing(x, t, cond, attention, where: str, field: str):
        """The velocity and the intermediates sown under a control whose ``field`` is set."""
        if attention is None or getattr(attention, field) is None:
            raise ValueError(f"{where} needs a control whose {field} is set")
        out, state = module.apply(
            {"params": params}, x, *inputs(x, t, cond), attention, mutable=["intermediates"]
        )
        return out.astype(jnp.float32), state

    def with_attention_map(x: Array, t: Array, cond: dict, attention: AttentionControl):
        """The velocity and the received-attention map of the blocks ``attention.capture``
        weights (``erg_jax.sag``), (b, F', H', W') on the token grid."""
        out, state = sowing(x, t, cond, attention, "with_attention_map", "capture")
        grid = tuple(n // p for n, p in zip(x.shape[1:4], s.patch, strict=True))
        return out, captured_map(state, x.shape[0]).reshape((x.shape[0],) + grid)

    def with_entropy(x: Array, t: Array, cond: dict, attention: AttentionControl):
        """The velocity and every block's self-attention entropy at the temperatures of
        ``attention.probe`` (``control.sow_entropy``), (L, T, b, h)."""
        out, state = sowing(x, t, cond, attention, "with_entropy", "probe")
        return out, probed_entropy(state)

    for fn in (branched, with_attention_map, with_entropy):
        setattr(denoiser, fn.__name__, fn)
    denoiser.config, denoiser.params = dict(config), params
    denoiser.num_layers = int(config["num_layers"])
    denoiser.layout = layout(config)  # its blocks as layer targets name them
    return denoiser
