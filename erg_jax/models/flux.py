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

Positions are 3-axis rotary embeddings (RoFormer, Su et al. 2021) over ids (0, row, col)
for the image tokens and zeros for the text; axis a rotates its axes_dims_rope[a]
channels of every head at frequencies theta^(-2i / dim_a), adjacent channel pairs.

Every attention layer, double blocks 0..D-1 then single blocks D..D+S-1, runs through
``erg_jax.control`` with its own control: SEG blurs the image tokens' queries (after the
QK norm, before the rotation; text queries are never blurred), ``attend`` applies the
energy (I-ERG) and PAG's identity, and SLG skips the whole block for both streams.

Blocks are a loop, or with ``scan_blocks`` one ``nn.scan`` per kind (params stacked, see
``flux_config``), either rematerialisable. The denoiser's ``branched`` runs the blocks
before the first one a control perturbs once for all guidance branches
(``erg_jax.models.shared_prefix``), entering through ``Flux``'s ``blocks`` argument.
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
    maybe_blur,
    skip_block,
)
from erg_jax.models.flux_config import (  # noqa: F401  (re-exported)
    PRESETS,
    ROPE_THETA,
    Run,
    Spec,
    block_name,
    check_sample_size,
    flux_config,
    run_name,
    runs,
    scanned,
    scanned_groups,
    stack_blocks,
    unstack_blocks,
)
from erg_jax.models.mmdit import MLP, QKNorm, dense, layer_norm, modulate, timestep_features
from erg_jax.models.shared_prefix import Layers, branched_layers

Array = jax.Array


def pack(x: Array, p: int) -> Array:
    """(b, H, W, C) latents -> (b, H/p * W/p, C*p*p) tokens, each patch's channels in
    (C, dy, dx) order as FluxPipeline packs them, tokens in row-major grid order."""
    b, hgt, wid, ch = x.shape
    x = x.reshape(b, hgt // p, p, wid // p, p, ch)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, (hgt // p) * (wid // p), ch * p * p)


def unpack(h: Array, grid: tuple[int, int], p: int) -> Array:
    """(..., N, C*p*p) tokens -> (..., H, W, C) latents; the inverse of ``pack``."""
    lead, ch = h.shape[:-2], h.shape[-1] // (p * p)
    h = h.reshape(lead + (grid[0], grid[1], ch, p, p))
    k = len(lead)
    h = h.transpose(tuple(range(k)) + tuple(k + a for a in (0, 3, 1, 4, 2)))
    return h.reshape(lead + (grid[0] * p, grid[1] * p, ch))


def position_ids(grid: tuple[int, int], text_len: int) -> np.ndarray:
    """Token positions (text_len + H*W, 3): zeros for the text, then (0, row, col) for
    the image tokens in row-major order, as FluxPipeline makes them."""
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    img = np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3)
    return np.concatenate([np.zeros((text_len, 3), img.dtype), img]).astype(np.float64)


def rope_tables(ids: np.ndarray, axes_dims: tuple[int, ...], theta: float = ROPE_THETA):
    """cos and sin (n, sum(axes_dims) / 2) float32 of every token's rotation angles.

    Axis a spends axes_dims[a] channels, axes_dims[a] / 2 pairs, on the angles
    pos_a * theta^(-2i / axes_dims[a]). Computed in float64 with numpy: the ids depend
    only on shapes, so the tables are constants of the traced program.
    """
    cols = []
    for a, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        cols.append(ids[:, a : a + 1] * freqs[None])
    angles = np.concatenate(cols, axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: Array, rope: tuple[Array, Array]) -> Array:
    """Rotates each channel pair (x0, x1) of x (b, n, h, d) by its token's angle."""
    cos, sin = (a[None, :, None, :] for a in rope)
    pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    # Per pair, not x * cos + rotate(x) * sin over whole vectors: XLA's CPU fusions then
    # round the rotation alike in every program, so a neutral control stays bit-exact.
    out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


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

        Returns:
          joint: (image output (b, N, D), text output (b, L, D)), both projected;
          single: (attention output (b, L + N, D) unprojected, None).
        """
        s = self.s
        q, k, v = self._qkv(x, added=False)
        text_len = x.shape[1] - self.grid[0] * self.grid[1]
        if self.joint:
            cq, ck, cv = self._qkv(c, added=True)
            text_len = c.shape[1]
            q, k, v = (jnp.concatenate(p, axis=1) for p in ((cq, q), (ck, k), (cv, v)))
        q = _blur_image(q, text_len, self.grid, control)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        # SAG's map: the image-query / image-key block (text tokens come first)
        capture_received(self, q, k, control, slice(text_len, None))
        out = attend(q, k, v, control, implementation=s.implementation)
        out = out.reshape(out.shape[:2] + (s.dim,))
        if not self.joint:
            return out, None
        img = dense(s, s.dim, ("heads", "embed"), "to_out")(out[:, text_len:])
        txt = dense(s, s.dim, ("heads", "embed"), "to_add_out")(out[:, :text_len])
        return img, txt


class DoubleBlock(nn.Module):
    """A double-stream block (FluxTransformerBlock); see the module docstring.

    Called as ``((x, c), y, rope, control) -> ((x, c), None)``, the carry / output pair
    of ``nn.scan``: x (b, N, D) image tokens, c (b, L, D) text tokens, y (b, D) the silu'd
    conditioning, rope the (cos, sin) tables.
    """

    s: Spec
    grid: tuple[int, int]

    @nn.compact
    def __call__(self, carry, y: Array, rope, control: AttentionControl | None):
        s, d = self.s, self.s.dim
        x, c = carry
        m = jnp.split(dense(s, 6 * d, ("embed", "mlp"), "norm1")(y), 6, axis=-1)
        cm = jnp.split(dense(s, 6 * d, ("embed", "mlp"), "norm1_context")(y), 6, axis=-1)
        xn, cn = modulate(layer_norm(x), m[0], m[1]), modulate(layer_norm(c), cm[0], cm[1])
        a_x, a_c = Attention(s, self.grid, name="attn")(xn, cn, rope, control)
        x_out = x + m[2][:, None] * a_x
        ff = MLP(s, 4 * d, d, name="ff")(modulate(layer_norm(x_out), m[3], m[4]))
        x_out = x_out + m[5][:, None] * ff
        c_out = c + cm[2][:, None] * a_c
        ff_c = MLP(s, 4 * d, d, name="ff_context")(modulate(layer_norm(c_out), cm[3], cm[4]))
        c_out = c_out + cm[5][:, None] * ff_c
        return (skip_block(x, x_out, control), skip_block(c, c_out, control)), None


class SingleBlock(nn.Module):
    """A single-stream block (FluxSingleTransformerBlock): attention and MLP in parallel
    on [text; image]. Called like ``DoubleBlock``; the carry stays the pair (x, c), so
    both kinds of block thread one state (through ``nn.scan`` and ``branched``)."""

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
        return (skip_block(x, x_out, control), skip_block(c, c_out, control)), None


class Flux(nn.Module):
    """FLUX.1 transformer: NHWC latents, flow time, text (and guidance) -> NHWC velocity."""

    s: Spec

    def _blocks(self, carry, y, rope, grid, attention):
        """Every block, loops or scans of like runs: (x, c) -> image tokens x (b, N, D)."""
        s = self.s
        for run in runs(s):
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
        scale, shift = jnp.split(dense(s, 2 * d, ("embed", "mlp"), "norm_out")(y), 2, axis=-1)
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
    return sum(int(np.prod(a.shape)) for a in leaves)


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
    'guidance' (b,) or scalar, the guidance scale FluxPipeline passes (3.5 for dev);
    attention an AttentionControl with ``num_layers`` entries or None. The velocity is
    returned in float32, shaped like x with out_channels channels.
    """
    module = flux_module(config)
    s = module.s

    def denoiser(x: Array, t: Array, cond: dict, attention: AttentionControl | None = None):
        out = module.apply({"params": params}, x, *_conditions(s, x, t, cond), attention)
        return out.astype(jnp.float32)

    def branched(x: Array, t: Array, cond: dict, controls: AttentionControl | None) -> Array:
        """Outputs (B, b, H, W, out) of B branches sharing x, t and cond, differing only in
        their stacked controls (leaves (B, L); None: B = 1); the blocks before the first
        one a control perturbs run once (``erg_jax.models.shared_prefix``)."""
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
        args = (x, *_conditions(s, x, t, cond), attention)
        out, state = module.apply({"params": params}, *args, mutable=["intermediates"])
        grid = (x.shape[0], x.shape[1] // s.patch_size, x.shape[2] // s.patch_size)
        return out.astype(jnp.float32), captured_map(state, x.shape[0]).reshape(grid)

    denoiser.branched = branched
    denoiser.with_attention_map = with_attention_map
    denoiser.config = dict(config)
    denoiser.params = params
    denoiser.num_layers = int(config["num_layers"])
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
    guided.num_layers = denoiser.num_layers
    return guided
