"""The FLUX.1 transformer (Black Forest Labs, 2024): a rectified-flow text-to-image model.

Laid out as diffusers' ``FluxTransformer2DModel``, so its checkpoints convert key by key
(``erg_jax.convert.flux``). The latents (b, H, W, 16) are packed into 2x2 patches, N
tokens of 64 channels; the T5 tokens c (b, L, 4096) and the image tokens are embedded to
D = 3072, and y = silu(emb(1000 t) [+ emb(1000 g)] + MLP(pooled CLIP)) drives every
adaLN modulation (g: the distilled guidance scale of FLUX.1 [dev]). Then:

    double block (x19): separate weights and (shift, scale, gate) for each stream,
        [q; k; v] = [W_c LN(c)*(1+s')+m' ; W_x LN(x)*(1+s)+m]     text first, then image
        QK RMSNorm per stream, rotary positions on q and k, one joint attention,
        x += g * W_o a_x;  c += g' * W_o' a_c;  gated GELU MLPs on each stream
    single block (x38): on h = [c; x], with one modulation (shift, scale, gate),
        hn = LN(h)*(1+s)+m;  h += g * W_out [attention(hn) ; gelu(W_mlp hn)]
    out: adaLN (no gate) on the image tokens, a linear, unpacked to NHWC.

Positions: 3-axis rotary embeddings (``flux_rope``). Every attention layer (double
blocks, then single) runs through ``erg_jax.control`` with its own control: SEG blurs the
image queries (after the QK norm, before the rotation), ``attend`` applies I-ERG's
energy and PAG's identity, TPG moves the image tokens' update, SLG skips the block. NAG
(Chen et al. 2025) runs text and y as [positive; negative], the image tokens once in the
double blocks (positive y), twice in the single blocks, as the authors' code does; the
image rows become ``nag_blend`` of the halves'.

Blocks are a loop, or with ``scan_blocks`` one ``nn.scan`` per kind (params stacked,
``flux_config``), either rematerialisable. The denoiser's ``branched`` runs the blocks
before the first one a control perturbs once for all branches (``shared_prefix``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from erg_jax.control import (
    AttentionControl,
    attend,
    capture_received,
    captured_map,
    image_block_output,
    maybe_blur,
    nag_blend,
    skip_block,
)
from erg_jax.models.flux_config import (  # noqa: F401  (re-exported)
    PRESETS,
    Run,
    Spec,
    block_name,
    check_sample_size,
    flux_config,
    layout,
    run_name,
    runs,
    scanned,
    scanned_groups,
    stack_blocks,
    unstack_blocks,
)
from erg_jax.models.flux_rope import (  # noqa: F401  (re-exported)
    apply_rope,
    pack,
    position_ids,
    rope_tables,
    unpack,
)
from erg_jax.models.mmdit import (
    MLP,
    QKNorm,
    dense,
    layer_norm,
    modulate,
    timestep_features,
)
from erg_jax.models.nag import nag_inputs, nag_text
from erg_jax.models.shared_prefix import Layers, branched_layers

Array = jax.Array


def _rounded(x: Array, dtype: Any) -> Array:
    """x (float32) rounded to dtype, as torch rounds after each op; XLA may skip the
    roundings of ``astype`` between ops (excess precision). Identity for float32."""
    return jax.lax.reduce_precision(x, jnp.finfo(dtype).nexp, jnp.finfo(dtype).nmant)


def _blur_image(q: Array, text_len: int, grid, control: AttentionControl | None) -> Array:
    """SEG's blur of the image queries of q (b, text_len + H*W, h, d), text left alone."""
    if control is None or control.blur is None:
        return q
    img = maybe_blur(q[:, text_len:], grid, control)
    return jnp.concatenate([q[:, :text_len], img], axis=1)


class Attention(nn.Module):
    """QK-normed rotary attention over [text; image] tokens (diffusers' FluxAttention).

    Attributes:
      s: shared settings.
      grid: (H/p, W/p), the image token grid (for SEG's query blur).
      joint: double block: the text stream has its own projections (add_*_proj,
        norm_added_*) and output (to_add_out), the image stream to_out. Single block:
        one stream [text; image] and no output projection (the block's proj_out is).
    """

    s: Spec
    grid: tuple[int, int]
    joint: bool = True

    def _qkv(self, x: Array, added: bool) -> tuple[Array, Array, Array]:
        """(b, n, D) tokens -> q, k, v (b, n, h, d), q and k RMS-normed."""
        s = self.s
        names = ("add_q_proj", "add_k_proj", "add_v_proj") if added else ("to_q", "to_k", "to_v")
        q, k, v = (
            dense(s, s.dim, ("embed", "heads"), n)(x).reshape(x.shape[:2] + (s.heads, s.head_dim))
            for n in names
        )
        norm = "added_" if added else ""
        return QKNorm(s, name=f"norm_{norm}q")(q), QKNorm(s, name=f"norm_{norm}k")(k), v

    @nn.compact
    def __call__(self, x: Array, c: Array | None, rope, control: AttentionControl | None):
        """Joint attention.

        Args:
          x: (b, N, D) image tokens (joint), or (b, L + N, D) the whole stream (single).
          c: (b, L, D) text tokens (joint), or None (single).
          rope: (cos, sin), each (L + N, head_dim / 2).
          control: this layer's control or None.

        Under NAG (``control.nag``) the text, and in a single block the whole stream, is
        2b, [positive; negative] halves, each attending within itself; the image rows
        become ``nag_blend`` of the two halves': b of them (joint), or the same in both
        halves (single), as the authors' processor writes them.

        Returns:
          joint: (image output (b, N, D), text output (b or 2b, L, D)), both projected;
          single: (attention output (b or 2b, L + N, D) unprojected, None).
        """
        s = self.s
        nag = None if control is None else control.nag
        q, k, v = self._qkv(x, added=False)
        text_len = x.shape[1] - self.grid[0] * self.grid[1]
        if self.joint:
            cq, ck, cv = self._qkv(c, added=True)
            text_len = c.shape[1]
            if nag is not None:  # the image tokens (b) attend with both texts' halves (2b)
                q, k, v = (jnp.concatenate([a, a]) for a in (q, k, v))
            q, k, v = (jnp.concatenate(p, axis=1) for p in ((cq, q), (ck, k), (cv, v)))
        q = _blur_image(q, text_len, self.grid, control)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        # SAG's map: the image-query / image-key block (text tokens come first)
        capture_received(self, q, k, control, slice(text_len, None))
        out = attend(q, k, v, control, implementation=s.implementation)
        out = out.reshape(out.shape[:2] + (s.dim,))
        img = out[:, text_len:]
        if nag is not None:
            img = nag_blend(*jnp.split(img, 2), nag, s.heads)
        if not self.joint:
            if nag is not None:
                out = jnp.concatenate([out[:, :text_len], jnp.concatenate([img, img])], axis=1)
            return out, None
        img = dense(s, s.dim, ("heads", "embed"), "to_out")(img)
        txt = dense(s, s.dim, ("heads", "embed"), "to_add_out")(out[:, :text_len])
        return img, txt


class DoubleBlock(nn.Module):
    """A double-stream block (FluxTransformerBlock); see the module docstring.

    Called as ``((x, c), y, rope, control) -> ((x, c), None)``, the carry / output pair
    of ``nn.scan``: x (b, N, D) image tokens, c (b, L, D) text tokens, y (b, D) the silu'd
    conditioning, rope the (cos, sin) tables. Under NAG c and y are 2b ([positive;
    negative]), x stays b and is modulated by the positive half of y, as the authors
    truncate AdaLayerNormZero's embedding to the image batch.
    """

    s: Spec
    grid: tuple[int, int]

    @nn.compact
    def __call__(self, carry, y: Array, rope, control: AttentionControl | None):
        s, d = self.s, self.s.dim
        x, c = carry
        m = jnp.split(dense(s, 6 * d, ("embed", "mlp"), "norm1")(y[: x.shape[0]]), 6, axis=-1)
        cm = jnp.split(dense(s, 6 * d, ("embed", "mlp"), "norm1_context")(y), 6, axis=-1)
        xn, cn = modulate(layer_norm(x), m[0], m[1]), modulate(layer_norm(c), cm[0], cm[1])
        a_x, a_c = Attention(s, self.grid, name="attn")(xn, cn, rope, control)
        x_out = x + m[2][:, None] * a_x
        ff = MLP(s, 4 * d, d, name="ff")(modulate(layer_norm(x_out), m[3], m[4]))
        x_out = x_out + m[5][:, None] * ff
        c_out = c + cm[2][:, None] * a_c
        ff_c = MLP(s, 4 * d, d, name="ff_context")(modulate(layer_norm(c_out), cm[3], cm[4]))
        c_out = c_out + cm[5][:, None] * ff_c
        return (image_block_output(x, x_out, control), skip_block(c, c_out, control)), None


class SingleBlock(nn.Module):
    """A single-stream block (FluxSingleTransformerBlock): attention and MLP in parallel
    on [text; image]. Called like ``DoubleBlock``; the carry stays the pair (x, c), so
    both kinds of block thread one state (through ``nn.scan`` and ``branched``). Under
    NAG both are 2b, each half modulated by its own y (the authors leave
    AdaLayerNormZeroSingle whole)."""

    s: Spec
    grid: tuple[int, int]

    @nn.compact
    def __call__(self, carry, y: Array, rope, control: AttentionControl | None):
        s, d = self.s, self.s.dim
        x, c = carry
        h = jnp.concatenate([c, x], axis=1)
        shift, scale, gate = jnp.split(dense(s, 3 * d, ("embed", "mlp"), "norm")(y), 3, axis=-1)
        hn = modulate(layer_norm(h), shift, scale)
        mlp = nn.gelu(dense(s, 4 * d, ("embed", "mlp"), "proj_mlp")(hn), approximate=True)
        att, _ = Attention(s, self.grid, joint=False, name="attn")(hn, None, rope, control)
        both = jnp.concatenate([att, mlp], axis=-1)
        u = gate[:, None] * dense(s, d, ("mlp", "embed"), "proj_out")(both)
        n = c.shape[1]
        x_out, c_out = x + u[:, n:], c + u[:, :n]
        return (image_block_output(x, x_out, control), skip_block(c, c_out, control)), None


class Flux(nn.Module):
    """FLUX.1 transformer: NHWC latents, flow time, text (and guidance) -> NHWC velocity."""

    s: Spec

    def _blocks(self, carry, y, rope, grid, attention):
        """Every block, loops or scans of like runs: (x, c) -> image tokens x (b, N, D)
        (under NAG (2b, N, D) after single blocks: [positive; negative])."""
        s = self.s
        for run in runs(s):
            if run.kind == "single" and carry[0].shape[0] != carry[1].shape[0]:
                carry = (jnp.concatenate([carry[0]] * 2), carry[1])  # NAG: both halves' images
            cls = DoubleBlock if run.kind == "double" else SingleBlock
            block = nn.remat(cls, prevent_cse=not s.scan) if s.remat else cls
            if scanned(run, s.scan):
                scan = nn.scan(
                    block,
                    variable_axes={"params": 0, "intermediates": 0},
                    split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, 0),
                    length=run.length,
                    metadata_params={nn.PARTITION_NAME: "layers"},
                )
                controls = None
                if attention is not None:
                    span = slice(run.first_layer, run.first_layer + run.length)
                    controls = jax.tree_util.tree_map(lambda a, span=span: a[span], attention)
                carry, _ = scan(s, grid, name=run_name(run))(carry, y, rope, controls)
                continue
            for i in range(run.start, run.stop):
                layer = run.first_layer + i - run.start
                control = None if attention is None else attention.layer(layer)
                carry, _ = block(s, grid, name=block_name(run.kind, i))(carry, y, rope, control)
        return carry[0]

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        context: Array,
        pooled: Array,
        guidance: Array | None = None,
        attention: AttentionControl | None = None,
        blocks: Callable | None = None,
        negative: tuple[Array, Array] | None = None,
    ) -> Array:
        """Velocity prediction.

        Args:
          x: (b, H, W, in_channels) latents, H and W multiples of patch_size.
          t: (b,) flow time in [0, 1] (1 = noise); embedded as 1000 t in the activation dtype.
          context: (b, L, joint_attention_dim) T5 tokens.
          pooled: (b, pooled_projection_dim) pooled CLIP embedding.
          guidance: (b,) distilled guidance scale (guidance_embeds only, else None).
          attention: AttentionControl with one entry per block (double, then single).
          blocks: replaces the blocks (``branched``): ``blocks((x, c), y, rope) -> x``
            from the embedded image tokens x (b, N, D), text tokens c (b, L, D), the
            conditioning y (b, D) and the rotary tables to the image tokens after the
            last block, (..., b, N, D) with leading (branch) axes, which the output keeps.
          negative: NAG's negative text (context, pooled), shaped as the positive's,
            exactly when ``attention.nag`` is set: the text stream and y run doubled.

        Returns:
          (..., b, H, W, out_channels) in the activation dtype.
        """
        s, p, d = self.s, self.s.patch_size, self.s.dim
        b, hgt, wid, _ = x.shape
        if hgt % p or wid % p:
            raise ValueError(f"latent size {(hgt, wid)} must be multiples of patch_size={p}")
        if (guidance is not None) != s.guidance:
            need = "needs a guidance scale" if s.guidance else "has no guidance embedding"
            raise ValueError(f"this FLUX.1 {need} (guidance_embeds={s.guidance})")
        if attention is not None and attention.num_layers not in (0, s.num_layers):
            raise ValueError(
                f"attention control has {attention.num_layers} layers, the model {s.num_layers}"
            )
        grid = (hgt // p, wid // p)
        context, pooled, t, guidance = nag_inputs(
            attention, negative, blocks, context, pooled, t, guidance
        )
        h = dense(s, d, (None, "embed"), "x_embedder")(pack(x, p).astype(s.dtype))

        def embed(values, name):
            # FluxTransformer2DModel's, in the activation dtype: bf16 makes 1000 * 3.5 3504
            scaled = 1000 * _rounded(values.astype(jnp.float32), s.dtype)
            feats = timestep_features(_rounded(scaled, s.dtype)).astype(s.dtype)
            return MLP(s, d, d, act="silu", name=name)(feats)

        y = embed(t, "time_embed")
        if guidance is not None:
            y = y + embed(guidance, "guidance_embed")
        y = nn.silu(y + MLP(s, d, d, act="silu", name="text_embed")(pooled.astype(s.dtype)))
        c = dense(s, d, (None, "embed"), "context_embedder")(context.astype(s.dtype))
        rope = rope_tables(position_ids(grid, context.shape[1]), s.axes_dims)

        if blocks is None:
            h = self._blocks((h, c), y, rope, grid, attention)
        else:
            h = blocks((h, c), y, rope)
        if negative is not None:
            h = h[:b]  # the positive half
        scale, shift = jnp.split(dense(s, 2 * d, ("embed", "mlp"), "norm_out")(y[:b]), 2, axis=-1)
        h = modulate(layer_norm(h), shift, scale)
        h = dense(s, p * p * s.out_channels, ("embed", None), "proj_out")(h)
        return unpack(h, grid, p)


def flux_module(config: dict) -> Flux:
    """The Flax module a config dict describes."""
    return Flux(Spec.from_config(config))


def _dummy_inputs(config: dict):
    p = int(config["patch_size"])
    x = jnp.zeros((1, p, p, int(config["in_channels"])), jnp.float32)
    context = jnp.zeros((1, 1, int(config["joint_attention_dim"])), jnp.float32)
    pooled = jnp.zeros((1, int(config["pooled_projection_dim"])), jnp.float32)
    guidance = jnp.zeros((1,), jnp.float32) if config["guidance_embeds"] else None
    return x, jnp.zeros((1,), jnp.float32), context, pooled, guidance


def init_params(config: dict, rng: Array) -> dict:
    """Random params (for tests), unboxed."""
    return nn.meta.unbox(flux_module(config).init(rng, *_dummy_inputs(config))["params"])


def abstract_params(config: dict) -> dict:
    """The params' shapes and dtypes (jax.ShapeDtypeStruct), without allocating them."""
    return jax.eval_shape(lambda rng: init_params(config, rng), jax.random.key(0))


def param_axes(config: dict) -> dict:
    """The logical axis names (jax.sharding.PartitionSpec) of every param."""
    boxed = jax.eval_shape(flux_module(config).init, jax.random.key(0), *_dummy_inputs(config))
    return nn.get_partition_spec(boxed)["params"]


def count_params(config: dict) -> int:
    """Number of parameters, from shapes alone (jax.eval_shape of the scanned layout,
    which traces one block of each kind however deep the model)."""
    leaves = jax.tree_util.tree_leaves(abstract_params(dict(config, scan_blocks=True)))
    return sum(math.prod(a.shape) for a in leaves)


def _conditions(s: Spec, x: Array, t: Array, cond: dict):
    """(t, context, pooled, guidance) from the cond dict, t and guidance broadcast to (b,)."""
    for key in ("context", "pooled"):
        if key not in cond:
            raise ValueError(f"FLUX.1 cond needs '{key}', got keys {sorted(cond)}")
    if s.guidance and "guidance" not in cond:
        raise ValueError(
            "this FLUX.1 has a guidance embedding (guidance_embeds, as dev): cond needs "
            "'guidance', the distilled guidance scale (b,)"
        )
    if not s.guidance and "guidance" in cond:
        raise ValueError(
            "this FLUX.1 has no guidance embedding (as schnell): cond must not hold 'guidance'"
        )
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    if jnp.finfo(s.dtype).bits < 32:
        # FluxPipeline's t: 1000 t in the latents' dtype, / 1000 (exact in float32)
        t = _rounded(_rounded(1000 * t, s.dtype) / 1000, s.dtype)
    g = None
    if s.guidance:
        g = jnp.broadcast_to(jnp.asarray(cond["guidance"], jnp.float32), (b,))
    return t, cond["context"], cond["pooled"], g


def make_denoiser(config: dict, params: Any):
    """``denoiser(x, t, cond, attention=None) -> velocity`` (docs/INTERFACES.md).

    x (b, H, W, in_channels) NHWC latents; t (b,) or scalar, the flow time in [0, 1];
    cond a dict with 'context' (b, L, joint_attention_dim), 'pooled'
    (b, pooled_projection_dim) and, exactly when the config has guidance_embeds,
    'guidance' (b,) or scalar, the guidance scale FluxPipeline passes (3.5 for dev), and
    under NAG (``attention.nag``) 'negative', a dict of the negative text's 'context' and
    'pooled' (its guidance is the positive's); attention an AttentionControl with
    ``num_layers`` entries or None. The velocity is returned in float32, shaped like x
    with out_channels channels.
    """
    module = flux_module(config)
    s = module.s

    def denoiser(x: Array, t: Array, cond: dict, attention: AttentionControl | None = None):
        args = (x, *_conditions(s, x, t, cond), attention)
        out = module.apply({"params": params}, *args, negative=nag_text(cond, attention))
        return out.astype(jnp.float32)

    def branched(x: Array, t: Array, cond: dict, controls: AttentionControl | None) -> Array:
        """Outputs (B, b, H, W, out) of B branches sharing x, t and cond, differing only in
        their stacked controls (leaves (B, L); None: B = 1); the blocks before the first
        one a control perturbs run once (``erg_jax.models.shared_prefix``)."""
        nag_text(cond, controls, "branched")
        grid = (x.shape[1] // s.patch_size, x.shape[2] // s.patch_size)

        def blocks(state, y, rope):
            layers = []
            for run in runs(s):
                cls = DoubleBlock if run.kind == "double" else SingleBlock
                blk = cls(s, grid, parent=None)
                apply = lambda q, st, c, blk=blk: blk.apply({"params": q}, st, y, rope, c)[0]
                if scanned(run, s.scan):
                    layers.append(Layers(apply, params[run_name(run)], stacked=True))
                else:
                    names = [block_name(run.kind, i) for i in range(run.start, run.stop)]
                    layers.append(Layers(apply, [params[n] for n in names]))
            return branched_layers(state, layers, controls)[0]  # the image tokens

        inputs = _conditions(s, x, t, cond)
        out = module.apply({"params": params}, x, *inputs, blocks=blocks)
        return out.astype(jnp.float32)

    def with_attention_map(x: Array, t: Array, cond: dict, attention: AttentionControl):
        """The velocity and the received-attention map of the layers ``attention.capture``
        weights (``erg_jax.sag``), (b, H/2, W/2) on the packed token grid."""
        if attention.capture is None:
            raise ValueError("with_attention_map needs a control whose capture is set")
        nag_text(cond, attention, "with_attention_map")
        args = (x, *_conditions(s, x, t, cond), attention)
        out, state = module.apply({"params": params}, *args, mutable=["intermediates"])
        grid = (x.shape[0], x.shape[1] // s.patch_size, x.shape[2] // s.patch_size)
        return out.astype(jnp.float32), captured_map(state, x.shape[0]).reshape(grid)

    denoiser.branched = branched
    denoiser.with_attention_map = with_attention_map
    denoiser.config = dict(config)
    denoiser.params = params
    denoiser.num_layers = int(config["num_layers"])
    denoiser.layout = layout(config)  # its blocks as layer targets name them
    return denoiser


def with_distilled_guidance(denoiser: Callable, scale: float) -> Callable:
    """The denoiser with FLUX.1 [dev]'s distilled guidance scale put into every cond.

    FluxPipeline gives every call of the transformer, the negative prompt's of true CFG
    too, the same guidance value (``guidance_scale``, (b,)). Filled in here rather than
    carried in the condition slots, it is one constant for every branch: CADS, which
    anneals the floating leaves of a condition, cannot reach it.

    Args:
      denoiser: a ``make_denoiser`` denoiser of a config with guidance_embeds.
      scale: the guidance value (3.5 is FluxPipeline's default).

    Returns:
      ``(x, t, cond, attention=None) -> velocity`` with cond {'context', 'pooled'}, its
      ``branched`` likewise, and the denoiser's config, params and num_layers.
    """
    if not denoiser.config.get("guidance_embeds"):
        raise ValueError("this FLUX.1 has no guidance embedding (as schnell): no distilled scale")

    def fill(x: Array, cond: dict) -> dict:
        return dict(cond, guidance=jnp.full((x.shape[0],), scale, jnp.float32))

    def guided(x: Array, t: Array, cond: dict, attention: AttentionControl | None = None):
        return denoiser(x, t, fill(x, cond), attention)

    def branched(x: Array, t: Array, cond: dict, controls: AttentionControl | None) -> Array:
        return denoiser.branched(x, t, fill(x, cond), controls)

    guided.branched = branched
    if hasattr(denoiser, "with_attention_map"):  # SAG's capture, where the model has it
        guided.with_attention_map = lambda x, t, cond, *args, **kw: denoiser.with_attention_map(
            x, t, fill(x, cond), *args, **kw
        )
    guided.config, guided.params = denoiser.config, denoiser.params
    guided.num_layers, guided.layout = denoiser.num_layers, denoiser.layout
    return guided
