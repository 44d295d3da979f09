"""The MMDiT of Stable Diffusion 3 / 3.5: a joint-attention text-to-image flow transformer.

Follows Esser et al. 2024 (Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis, sec. 4 and fig. 2) as laid out in diffusers' ``SD3Transformer2DModel``, so its
checkpoints convert key by key (``erg_jax.convert.sd3``). Per block i, with the image
tokens x (b, N, D), the text tokens c (b, L, D) and y = silu(timestep emb + pooled emb):

    (shift, scale, gate) = Linear(y)                         adaLN-Zero, one set per use
    [q; k; v] = [W_x LN(x)*(1+s)+m ; W_c LN(c)*(1+s')+m']    image tokens first, then text
    a_x, a_c  = attention over the N + L tokens, split back   (QK RMSNorm in SD3.5)
    x += g * W_o a_x;   c += g' * W_o' a_c;   then gated GELU MLPs on each stream

SD3.5's dual-attention layers add a second, image-only self-attention ``attn2`` with its
own modulation; the last block keeps only the image stream (``context_pre_only``). The
velocity comes out of a final adaLN + linear, unpatchified to NHWC.

Every attention runs through ``erg_jax.control``: the block's control blurs the image
tokens' queries (SEG; text queries are never blurred), drives ``attend`` (energy / PAG) in
the joint attention and, with the same control, in attn2, and can skip the whole block for
both streams (SLG). Asked to (``capture``, SAG), the joint attention also reports the
attention its image tokens receive from the image queries; asked to (``probe``), its
attention entropy at chosen temperatures (the denoiser's ``with_entropy``). Under NAG
(``nag``, Chen et al. 2025) the text stream and y run twice, [positive; negative] (2b),
the image stream once, modulated by the positive y, and the joint attention's image rows
are ``nag_blend`` of the two texts' (attn2 is left alone), as the authors' code has it.
Under EMAG-Q (``emag``) the joint attention's image queries (after the QK norm) update
their EMA and, in the selected block, are replaced by it (the denoiser's ``with_emag``).

Blocks are a Python loop, or with ``scan_blocks`` one ``nn.scan`` per run of blocks
with the same parameters (``segments``: in SD3.5-medium the dual-attention blocks 0..12,
the plain blocks 13..22, then the last, text-free block 23), which keeps compile time
flat in the depth; either can be rematerialised. A scanned run stores its params stacked
under ``blocks_{first}_to_{last}``; ``stack_blocks`` and ``unstack_blocks`` convert.

Guidance branches that share their condition (I-ERG with the strong text, PAG, SEG, SLG)
differ only from the first block a control perturbs: the denoiser's ``branched`` runs
the blocks before it once for all of them (``erg_jax.models.shared_prefix``), entering
the network through ``MMDiT``'s ``blocks`` argument.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from erg_jax.control import (
    AttentionControl,
    attend,
    capture_received,
    captured_map,
    image_block_output,
    maybe_blur,
    nag_blend,
    probed_entropy,
    skip_block,
    sow_entropy,
)
from erg_jax.emag import emag_queries, sown_state
from erg_jax.models.mmdit_config import (  # noqa: F401  (re-exported)
    PRESETS,
    QK_NORMS,
    Segment,
    Spec,
    is_scanned,
    layout,
    mmdit_config,
    scanned_groups,
    segment_name,
    segments,
    stack_blocks,
    unstack_blocks,
)
from erg_jax.models.mmdit_layers import (  # noqa: F401  (re-exported: FLUX.1 uses them)
    dense,
    layer_norm,
    modulate,
    timestep_features,
)
from erg_jax.models.nag import nag_inputs, nag_text
from erg_jax.models.shared_prefix import Layers, branched_layers

Array = jax.Array


def pos_table(dim: int, grid: int, base_size: int) -> Array:
    """The 2-D sin-cos position table (grid * grid, dim), rows in row-major grid order.

    Positions are arange(grid) * base_size / grid; the first dim/2 channels encode the
    column, the last dim/2 the row, each as [sin, cos] at frequencies 10000^(-4i/dim).
    Computed with jnp (float32), so ``jax.eval_shape`` of an init never builds it.
    """
    pos = jnp.arange(grid, dtype=jnp.float32) * (base_size / grid)
    omega = 1.0 / 10000 ** (jnp.arange(dim // 4, dtype=jnp.float32) / (dim / 4))
    ang = pos[:, None] * omega[None]
    emb = jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=1)  # (grid, dim/2)
    col = jnp.broadcast_to(emb[None, :, :], (grid, grid, dim // 2))
    row = jnp.broadcast_to(emb[:, None, :], (grid, grid, dim // 2))
    return jnp.concatenate([col, row], axis=-1).reshape(grid * grid, dim)


class QKNorm(nn.Module):
    """RMSNorm or LayerNorm (eps 1e-6, affine) over head_dim of (b, n, h, d) q or k."""

    s: Spec

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        x32 = x.astype(jnp.float32)
        if self.s.qk_norm == "layer_norm":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + 1e-6)
        init = nn.with_logical_partitioning(nn.initializers.ones, (None,))
        y = y * self.param("scale", init, (d,), self.s.param_dtype).astype(jnp.float32)
        if self.s.qk_norm == "layer_norm":
            zeros = nn.with_logical_partitioning(nn.initializers.zeros, (None,))
            y = y + self.param("bias", zeros, (d,), self.s.param_dtype).astype(jnp.float32)
        return y.astype(self.s.dtype)


class Attention(nn.Module):
    """Joint attention of image and text tokens, or image-only self-attention.

    Attributes:
      s: shared settings.
      grid: (H/p, W/p), the image token grid (for SEG's query blur).
      joint: whether a text stream takes part (add_q/k/v_proj, norm_added_q/k).
      context_out: whether the text stream gets an output projection (to_add_out).
    """

    s: Spec
    grid: tuple[int, int]
    joint: bool = True
    context_out: bool = True

    def _qkv(self, x: Array, added: bool) -> tuple[Array, Array, Array]:
        """(b, n, D) tokens -> q, k, v (b, n, h, d), QK-normed; added: the text stream."""
        s = self.s
        names = ("add_q_proj", "add_k_proj", "add_v_proj") if added else ("to_q", "to_k", "to_v")
        norm = "added_" if added else ""
        q, k, v = (
            dense(s, s.dim, ("embed", "heads"), n)(x).reshape(x.shape[:2] + (s.heads, s.head_dim))
            for n in names
        )
        if s.qk_norm is not None:
            q = QKNorm(s, name=f"norm_{norm}q")(q)
            k = QKNorm(s, name=f"norm_{norm}k")(k)
        return q, k, v

    @nn.compact
    def __call__(self, x: Array, c: Array | None, control: AttentionControl | None):
        """x (b, N, D) image tokens, c (b, L, D) text tokens or None.

        Under NAG (``control.nag``, joint attention only) c holds both texts (2b, L, D),
        [positive; negative]: each half attends within itself and the image rows become
        ``nag_blend`` of the two halves', b of them; the text rows stay 2b.

        Returns:
          (image output (b, N, D), text output (b or 2b, L, D) or None).
        """
        s, n = self.s, x.shape[1]
        nag = control.nag if self.joint and control is not None else None
        q, k, v = self._qkv(x, added=False)
        q = emag_queries(self, q, control if self.joint else None)  # EMAG-Q, where asked
        q = maybe_blur(q, self.grid, control)
        if self.joint:
            cq, ck, cv = self._qkv(c, added=True)
            if nag is not None:  # the image tokens (b) attend with both texts' halves (2b)
                q, k, v = (jnp.concatenate([a, a]) for a in (q, k, v))
            q, k, v = (jnp.concatenate(p, axis=1) for p in ((q, cq), (k, ck), (v, cv)))
            # SAG's map: the image-query / image-key block of the joint attention
            capture_received(self, q, k, control, slice(0, n))
            sow_entropy(self, q, k, control)  # the entropy probe: joint attention only
        out = attend(q, k, v, control, implementation=s.implementation)
        out = out.reshape(out.shape[:2] + (s.dim,))
        img = out[:, :n]
        if nag is not None:
            img = nag_blend(*jnp.split(img, 2), nag, s.heads)
        img = dense(s, s.dim, ("heads", "embed"), "to_out")(img)
        txt = None
        if self.joint and self.context_out:
            txt = dense(s, s.dim, ("heads", "embed"), "to_add_out")(out[:, n:])
        return img, txt


class MLP(nn.Module):
    """linear_2(act(linear_1(x))): the feed-forward (GELU-tanh, 4x) and the embedders."""

    s: Spec
    hidden: int
    out: int
    act: str = "gelu"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = dense(self.s, self.hidden, ("embed", "mlp"), "linear_1")(x)
        h = nn.gelu(h, approximate=True) if self.act == "gelu" else nn.silu(h)
        return dense(self.s, self.out, ("mlp", "embed"), "linear_2")(h)


class JointBlock(nn.Module):
    """One MMDiT block (image and text streams); see the module docstring.

    Called as ``((x, c), y, control) -> ((x, c), None)``, the carry / output pair of
    ``nn.scan``: x (b, N, D) image tokens, c (b, L, D) text tokens, y (b, D) the silu'd
    conditioning. In the last block (context_pre_only) c comes back unchanged: nothing
    reads it. Under NAG c and y are 2b ([positive; negative]), x stays b.
    """

    s: Spec
    grid: tuple[int, int]
    dual: bool = False
    pre_only: bool = False

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], y: Array, control: AttentionControl | None):
        s, d = self.s, self.s.dim
        x, c = carry
        pre_only, dual = self.pre_only, self.dual
        m = jnp.split(  # NAG: the image stream (b) takes the positive y of y (2b)
            dense(s, (9 if dual else 6) * d, ("embed", "mlp"), "norm1")(y[: x.shape[0]]),
            9 if dual else 6,
            axis=-1,
        )
        xn = layer_norm(x)
        if pre_only:
            scale, shift = jnp.split(dense(s, 2 * d, ("embed", "mlp"), "norm1_context")(y), 2, -1)
            cm = None
        else:
            cm = jnp.split(dense(s, 6 * d, ("embed", "mlp"), "norm1_context")(y), 6, axis=-1)
            shift, scale = cm[0], cm[1]
        a_x, a_c = Attention(s, self.grid, context_out=not pre_only, name="attn")(
            modulate(xn, m[0], m[1]), modulate(layer_norm(c), shift, scale), control
        )
        out = x + m[2][:, None] * a_x
        if dual:
            a2, _ = Attention(s, self.grid, joint=False, name="attn2")(
                modulate(xn, m[6], m[7]), None, control
            )
            out = out + m[8][:, None] * a2
        ff = MLP(s, 4 * d, d, name="ff")(modulate(layer_norm(out), m[3], m[4]))
        out = out + m[5][:, None] * ff
        c_out = c
        if not pre_only:
            c_out = c + cm[2][:, None] * a_c
            ff_c = MLP(s, 4 * d, d, name="ff_context")(modulate(layer_norm(c_out), cm[3], cm[4]))
            c_out = c_out + cm[5][:, None] * ff_c
        return (image_block_output(x, out, control), skip_block(c, c_out, control)), None


class MMDiT(nn.Module):
    """SD3 / SD3.5 transformer: NHWC latents, timesteps and text -> NHWC velocity."""

    s: Spec

    def _blocks(self, carry, y, grid, attention):
        """The blocks, loops or scans of like runs: (x, c) -> the image tokens x (b, N, D)."""
        s, (h, c) = self.s, carry
        block = nn.remat(JointBlock, prevent_cse=not s.scan) if s.remat else JointBlock
        for seg in segments(s):
            if is_scanned(seg, s.scan):
                run = nn.scan(
                    block,
                    variable_axes={"params": 0, "intermediates": 0},
                    split_rngs={"params": True},
                    in_axes=(nn.broadcast, 0),
                    length=seg.stop - seg.start,
                    metadata_params={nn.PARTITION_NAME: "layers"},
                )
                controls = None
                if attention is not None:
                    controls = jax.tree_util.tree_map(
                        lambda a, seg=seg: a[seg.start : seg.stop], attention
                    )
                (h, c), _ = run(s, grid, seg.dual, seg.pre_only, name=segment_name(seg))(
                    (h, c), y, controls
                )
                continue
            for i in range(seg.start, seg.stop):
                control = None if attention is None else attention.layer(i)
                (h, c), _ = block(s, grid, seg.dual, seg.pre_only, name=f"blocks_{i}")(
                    (h, c), y, control
                )
        return h

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        context: Array,
        pooled: Array,
        attention: AttentionControl | None = None,
        blocks: Callable | None = None,
        negative: tuple[Array, Array] | None = None,
    ) -> Array:
        """Velocity prediction.

        Args:
          x: (b, H, W, in_channels) latents; H/p and W/p at most pos_embed_max_size.
          t: (b,) timesteps, 1000 * sigma.
          context: (b, L, joint_attention_dim) text-encoder tokens.
          pooled: (b, pooled_projection_dim) pooled text embedding.
          attention: AttentionControl with one entry per block, or None.
          blocks: replaces the blocks (``branched``): ``blocks((x, c), y) -> x`` from the
            embedded image tokens x (b, N, D), text tokens c (b, L, D) and conditioning
            y (b, D) to the image tokens after the last block, (..., b, N, D) with any
            leading (branch) axes, which the output keeps.
          negative: NAG's negative text (context, pooled), shaped as the positive's,
            exactly when ``attention.nag`` is set: the text stream and y run doubled.

        Returns:
          (..., b, H, W, out_channels) in the activation dtype.
        """
        s, p, d = self.s, self.s.patch_size, self.s.dim
        b, hgt, wid, _ = x.shape
        context, pooled, t = nag_inputs(attention, negative, blocks, context, pooled, t)
        grid = (hgt // p, wid // p)
        if hgt % p or wid % p or max(grid) > s.pos_max:
            raise ValueError(
                f"latent size {(hgt, wid)} must be multiples of patch_size={p} "
                f"with at most pos_embed_max_size={s.pos_max} patches a side"
            )
        if attention is not None and attention.num_layers not in (0, s.num_layers):
            raise ValueError(
                f"attention control has {attention.num_layers} layers, the model {s.num_layers}"
            )
        h = nn.Conv(
            d,
            (p, p),
            strides=p,
            padding="VALID",
            dtype=s.dtype,
            param_dtype=s.param_dtype,
            precision=s.precision,
            name="patch_embed",
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        )(x)
        table = self.param(
            "pos_embed",
            nn.with_logical_partitioning(
                lambda *_: pos_table(d, s.pos_max, s.base_size).astype(s.param_dtype),
                (None, "embed"),
            ),
        )
        top, left = (s.pos_max - grid[0]) // 2, (s.pos_max - grid[1]) // 2
        pos = table.reshape(s.pos_max, s.pos_max, d)[top : top + grid[0], left : left + grid[1]]
        h = (h.astype(jnp.float32) + pos.astype(jnp.float32)).astype(s.dtype).reshape(b, -1, d)

        y = MLP(s, d, d, act="silu", name="time_embed")(timestep_features(t).astype(s.dtype))
        y = y + MLP(s, d, d, act="silu", name="text_embed")(pooled.astype(s.dtype))
        y = nn.silu(y)
        c = dense(s, d, (None, "embed"), "context_embedder")(context.astype(s.dtype))

        h = self._blocks((h, c), y, grid, attention) if blocks is None else blocks((h, c), y)
        scale, shift = jnp.split(dense(s, 2 * d, ("embed", "mlp"), "norm_out")(y[:b]), 2, axis=-1)
        h = modulate(layer_norm(h), shift, scale)
        h = dense(s, p * p * s.out_channels, ("embed", None), "proj_out")(h)
        h = h.reshape(h.shape[:-2] + (grid[0], grid[1], p, p, s.out_channels))
        return jnp.swapaxes(h, -4, -3).reshape(h.shape[:-5] + (hgt, wid, s.out_channels))


def mmdit_module(config: dict) -> MMDiT:
    """The Flax module a config dict describes."""
    return MMDiT(Spec.from_config(config))


def _dummy_inputs(config: dict, size: int | None = None, tokens: int = 1):
    p = int(config["patch_size"])
    size = size or p
    x = jnp.zeros((1, size, size, int(config["in_channels"])), jnp.float32)
    context = jnp.zeros((1, tokens, int(config["joint_attention_dim"])), jnp.float32)
    pooled = jnp.zeros((1, int(config["pooled_projection_dim"])), jnp.float32)
    return x, jnp.zeros((1,), jnp.float32), context, pooled


def init_params(config: dict, rng: Array) -> dict:
    """Random params (for tests), unboxed; the position table is the sin-cos one."""
    variables = mmdit_module(config).init(rng, *_dummy_inputs(config))
    return nn.meta.unbox(variables["params"])


def abstract_params(config: dict) -> dict:
    """The params' shapes and dtypes (jax.ShapeDtypeStruct), without allocating them."""
    return jax.eval_shape(lambda rng: init_params(config, rng), jax.random.key(0))


def param_axes(config: dict) -> dict:
    """The logical axis names (jax.sharding.PartitionSpec) of every param."""
    boxed = jax.eval_shape(mmdit_module(config).init, jax.random.key(0), *_dummy_inputs(config))
    return nn.get_partition_spec(boxed)["params"]


def count_params(config: dict, *, buffers: bool = False) -> int:
    """Number of parameters, from shapes alone (jax.eval_shape).

    Args:
      buffers: also count the fixed position table ``pos_embed``, which diffusers holds
        as a buffer rather than a parameter.
    """
    shapes = abstract_params(config)
    if not buffers:
        shapes = {k: v for k, v in shapes.items() if k != "pos_embed"}
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes))


def make_denoiser(config: dict, params: Any):
    """``denoiser(x, t, cond, attention=None) -> velocity`` (docs/INTERFACES.md).

    x (b, H, W, C) NHWC latents; t (b,) or scalar, 1000 * sigma; cond a dict with
    'context' (b, L, joint_attention_dim) and 'pooled' (b, pooled_projection_dim), and
    under NAG (``attention.nag``) 'negative', a dict of the same two for the negative
    text; attention an AttentionControl with ``num_layers`` entries or None. The velocity
    is returned in float32, shaped like x with out_channels channels.
    """
    module = mmdit_module(config)

    def denoiser(x: Array, t: Array, cond: dict, attention: AttentionControl | None = None):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        args = (x, t, cond["context"], cond["pooled"], attention)
        out = module.apply({"params": params}, *args, negative=nag_text(cond, attention))
        return out.astype(jnp.float32)

    def branched(x: Array, t: Array, cond: dict, controls: AttentionControl | None) -> Array:
        """Outputs (B, b, H, W, out) of B branches sharing x, t and cond, differing only in
        their stacked controls (leaves (B, L); None: B = 1); the blocks before the first
        one a control perturbs run once (``erg_jax.models.shared_prefix``)."""
        nag_text(cond, controls, "branched")
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        s, p = module.s, module.s.patch_size
        grid = (x.shape[1] // p, x.shape[2] // p)

        def blocks(state, y):
            runs = []
            for seg in segments(s):
                blk = JointBlock(s, grid, seg.dual, seg.pre_only, parent=None)
                apply = lambda q, st, c, blk=blk: blk.apply({"params": q}, st, y, c)[0]
                if is_scanned(seg, s.scan):
                    runs.append(Layers(apply, params[segment_name(seg)], stacked=True))
                else:
                    layers = [params[f"blocks_{i}"] for i in range(seg.start, seg.stop)]
                    runs.append(Layers(apply, layers))
            return branched_layers(state, runs, controls)[0]  # the image tokens

        out = module.apply({"params": params}, x, t, cond["context"], cond["pooled"], blocks=blocks)
        return out.astype(jnp.float32)

    def sowing(x, t, cond, attention, where: str, field: str, nag: bool = False):
        """The velocity and the intermediates sown under a control whose ``field`` is set."""
        if getattr(attention, field) is None:
            raise ValueError(f"{where} needs a control whose {field} is set")
        negative = nag_text(cond, attention, None if nag else where)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        args = (x, t, cond["context"], cond["pooled"], attention)
        kw = dict(negative=negative, mutable=["intermediates"])
        out, state = module.apply({"params": params}, *args, **kw)
        return out.astype(jnp.float32), state

    def with_attention_map(x: Array, t: Array, cond: dict, attention: AttentionControl):
        """The velocity and the received-attention map of the blocks ``attention.capture``
        weights (``erg_jax.sag``), (b, H/p, W/p) on the token grid."""
        out, state = sowing(x, t, cond, attention, "with_attention_map", "capture")
        p = module.s.patch_size
        grid = (x.shape[0], x.shape[1] // p, x.shape[2] // p)
        return out, captured_map(state, x.shape[0]).reshape(grid)

    def with_entropy(x: Array, t: Array, cond: dict, attention: AttentionControl):
        """The velocity and every block's joint-attention entropy at the temperatures of
        ``attention.probe`` (``control.sow_entropy``), (L, T, b, h)."""
        out, state = sowing(x, t, cond, attention, "with_entropy", "probe")
        return out, probed_entropy(state)

    def with_emag(x: Array, t: Array, cond: dict, attention: AttentionControl):
        """The velocity under EMAG-Q (``attention.emag``, ``erg_jax.emag``; and NAG) and every
        block's new EMA of its image queries and delta, ((L, b, N, h, d), (L, b)); a block
        that does not accumulate returns its E unchanged and delta 0."""
        out, state = sowing(x, t, cond, attention, "with_emag", "emag", nag=True)
        return out, sown_state(state["intermediates"])

    def query_shape(x: Array) -> tuple[int, int, int]:
        """(N_img, heads, head_dim) of the joint attention's image queries for x (b, H, W, C)."""
        p = module.s.patch_size
        return (x.shape[1] // p) * (x.shape[2] // p), module.s.heads, module.s.head_dim

    for fn in (branched, with_attention_map, with_entropy, with_emag, query_shape):
        setattr(denoiser, fn.__name__, fn)
    denoiser.config, denoiser.params = dict(config), params
    denoiser.num_layers = int(config["num_layers"])
    denoiser.layout = layout(config)  # its blocks as layer targets name them
    return denoiser
