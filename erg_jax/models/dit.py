"""DiT and SiT: class-conditional latent diffusion / flow transformers, NHWC, in Flax.

Follows Peebles & Xie 2023 (Scalable Diffusion Models with Transformers, sec. 3.2 and
fig. 3: patchify, adaLN-Zero blocks, final adaLN + linear) and its SiT variant (Ma et al.
2024, Scalable Interpolant Transformers: the same network trained on an interpolant).
With the conditioning c = MLP(sin-cos(t)) + E[y] and, per block,

    (m1, s1, g1, m2, s2, g2) = Linear(silu(c))
    x = x + g1 * Attn(LN(x) * (1 + s1) + m1)
    x = x + g2 * MLP(LN(x) * (1 + s2) + m2)

the output is Linear(LN(x) * (1 + s) + m) unpatchified to (b, H, W, out_channels).

Conventions of the two models (config fields ``prediction`` and ``time``):

- DiT: ``t`` is the DDPM step 0..999 (linear betas), the output is eps followed by the
  learned variance interpolation v (out_channels = 2C, ``learned_sigma``).
- SiT: ``t`` in [0, 1] with t = 0 pure noise and t = 1 data, x_t = t x_data +
  (1 - t) noise (SiT's linear ``ICPlan``), and the output is the velocity
  d x_t / dt = x_data - noise. Released SiT checkpoints keep 2C output channels (trained
  with learn_sigma=True) whose second half SiT's forward drops; we drop it too, so a SiT
  denoiser returns C channels. ``erg_jax.samplers`` maps its noise level s to t = 1 - s
  and negates the velocity (time="sit").

Each block's attention runs through ``erg_jax.control`` (SEG blur, energy / PAG in
``attend``, SLG skip), so guidance perturbs exactly the layers a control selects;
``DiTDenoiser.with_attention_map`` also returns a chosen block's attention map (SAG),
``with_entropy`` every block's attention entropy at chosen temperatures, ``with_emag``
EMAG-Q's weak forward and the EMA of every block's queries.
The presets and their checks are ``erg_jax.models.dit_config``.
"""

from __future__ import annotations

import math
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
    probed_entropy,
    sow_entropy,
)
from erg_jax.emag import emag_queries, sown_state
from erg_jax.models.dit_config import (  # noqa: F401  (re-exported)
    SIZES,
    Spec,
    check_config,
    dit_config,
    layout,
)
from erg_jax.models.shared_prefix import Layers, branched_layers
from erg_jax.models.stacking import stack_groups, unstack_groups

Array = jax.Array


def sincos_table(dim: int, grid: int) -> np.ndarray:
    """DiT's fixed 2-D position table (grid * grid, dim), tokens in row-major order.

    The first dim/2 channels encode the token's column, the last dim/2 its row, each as
    [sin(pos * w_i), cos(pos * w_i)] with w_i = 10000^(-i / (dim/4)), i < dim/4.
    """
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    ang = np.outer(np.arange(grid, dtype=np.float64), omega)
    emb = np.concatenate([np.sin(ang), np.cos(ang)], axis=1)  # (grid, dim/2)
    col = np.broadcast_to(emb[None], (grid, grid, dim // 2))
    row = np.broadcast_to(emb[:, None], (grid, grid, dim // 2))
    return np.concatenate([col, row], -1).reshape(grid * grid, dim).astype(np.float32)


def timestep_features(t: Array, dim: int = 256, shift: float = 0.0) -> Array:
    """[cos(t w_i), sin(t w_i)] with w_i = 10000^(-i / (dim/2 - shift)); (b,) -> (b, dim)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - shift))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _dense(s: Spec, features: int, axes: tuple, name: str | None = None) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=s.dtype,
        param_dtype=s.param_dtype,
        precision=s.precision,
        name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
    )


def _layer_norm(x: Array, eps: float) -> Array:
    """LayerNorm without affine over the last axis, statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
    """x (b, n, D) * (1 + scale) + shift with shift, scale (b, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class QKV(nn.Module):
    """Fused query / key / value projection (b, n, D) -> (b, n, 3, D); kernel (D, 3, D)."""

    s: Spec

    @nn.compact
    def __call__(self, h: Array) -> Array:
        s, d = self.s, self.s.hidden
        init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
        w = self.param(
            "kernel",
            nn.with_logical_partitioning(init, ("embed", None, "heads")),
            (d, 3, d),
            s.param_dtype,
        )
        b = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, (None, "heads")),
            (3, d),
            s.param_dtype,
        )
        out = jnp.einsum(
            "bnd,dke->bnke", h.astype(s.dtype), w.astype(s.dtype), precision=s.precision
        )
        return out + b.astype(s.dtype)


class Block(nn.Module):
    """One adaLN-Zero DiT block: (x (b, n, D), silu(c) (b, D), control) -> (x, None).

    The (x, None) return is the carry / output pair of ``nn.scan``.
    """

    s: Spec
    grid: tuple[int, int]

    @nn.compact
    def __call__(self, x: Array, cond: Array, control: AttentionControl | None):
        s, d = self.s, self.s.hidden
        b, n, _ = x.shape
        mod = _dense(s, 6 * d, ("embed", "mlp"), "adaLN_modulation")(cond)
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)

        h = _modulate(_layer_norm(x, 1e-6), shift1, scale1)
        qkv = QKV(s, name="qkv")(h)
        q, k, v = (qkv[:, :, i].reshape(b, n, s.heads, d // s.heads) for i in range(3))
        q = emag_queries(self, q, control)  # EMAG-Q's EMA of the raw queries, where asked
        q = maybe_blur(q, self.grid, control)
        capture_received(self, q, k, control)  # SAG's map, only where the control asks
        sow_entropy(self, q, k, control)  # the entropy probe, likewise
        if s.precision is None:
            a = attend(q, k, v, control, implementation=s.implementation)
        else:  # attend takes no precision argument; its einsums read this default.
            with jax.default_matmul_precision(s.precision.name.lower()):
                a = attend(q, k, v, control, implementation=s.implementation)
        a = _dense(s, d, ("heads", "embed"), "proj")(a.reshape(b, n, d).astype(s.dtype))
        y = x + gate1[:, None] * a

        h = _modulate(_layer_norm(y, s.mlp_norm_eps), shift2, scale2)
        h = nn.gelu(_dense(s, s.mlp_hidden, ("embed", "mlp"), "fc1")(h), approximate=True)
        y = y + gate2[:, None] * _dense(s, d, ("mlp", "embed"), "fc2")(h)
        return image_block_output(x, y, control), None


class DiT(nn.Module):
    """The DiT / SiT network (module docstring); ``embed``, the blocks and ``head`` are
    apart so that ``DiTDenoiser.branched`` can run the prefix once for many branches."""

    s: Spec

    def setup(self):
        s, p, d = self.s, self.s.patch, self.s.hidden
        grid = (s.sample_size // p,) * 2
        self.patch_embed = nn.Conv(
            d,
            (p, p),
            strides=p,
            padding="VALID",
            dtype=s.dtype,
            param_dtype=s.param_dtype,
            precision=s.precision,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        )
        self.pos_embed = self.param(
            "pos_embed",
            nn.with_logical_partitioning(
                lambda *_: jnp.asarray(sincos_table(d, grid[0]), s.param_dtype), (None, "embed")
            ),
        )
        self.time_embed_1 = _dense(s, d, (None, "mlp"))
        self.time_embed_2 = _dense(s, d, ("mlp", "embed"))
        if s.num_classes > 0:
            self.class_embed = nn.Embed(
                s.num_classes + 1,
                d,
                dtype=s.dtype,
                param_dtype=s.param_dtype,
                embedding_init=nn.with_logical_partitioning(
                    nn.initializers.normal(0.02), (None, "embed")
                ),
            )
        block = nn.remat(Block, prevent_cse=not s.scan) if s.remat else Block
        if s.scan:
            self.blocks = nn.scan(
                block,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, 0),
                length=s.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(s, grid)
        else:
            self.blocks = [block(s, grid) for _ in range(s.num_layers)]  # blocks_0, ...
        self.final_modulation = _dense(s, 2 * d, ("embed", "mlp"))
        self.final_linear = _dense(s, p * p * s.out_channels, ("embed", None))

    def embed(self, x: Array, t: Array, cond: Array | None) -> tuple[Array, Array]:
        """Patch, position, timestep and class embedding: the tokens (b, n, D) and the
        blocks' conditioning silu(c) (b, D). Arguments as ``__call__``."""
        s, d = self.s, self.s.hidden
        b, hgt, wid, _ = x.shape
        if (hgt, wid) != (s.sample_size, s.sample_size):
            raise ValueError(f"latents must be {s.sample_size}x{s.sample_size}, got {hgt}x{wid}")
        h = self.patch_embed(x.astype(s.dtype))
        h = h.reshape(b, -1, d) + self.pos_embed.astype(s.dtype)[None]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        c = timestep_features(t, 256, s.time_freq_shift).astype(s.dtype)
        c = self.time_embed_2(nn.silu(self.time_embed_1(c)))
        if s.num_classes > 0:
            if cond is None:
                raise ValueError("a class-conditional DiT needs cond (labels or embeddings)")
            cond = jnp.asarray(cond)
            if jnp.issubdtype(cond.dtype, jnp.integer):
                cond = self.class_embed(cond)
            elif cond.shape != (b, d):
                raise ValueError(f"float cond must be class embeddings (b, {d}), got {cond.shape}")
            c = c + cond.astype(s.dtype)
        return h, nn.silu(c)

    def head(self, h: Array, y: Array, shape: tuple[int, ...]) -> Array:
        """Final adaLN, linear and unpatchify: tokens (..., b, n, D) -> (..., b, H, W, out)."""
        s, p = self.s, self.s.patch
        hgt, wid = shape[1:3]
        shift, scale = jnp.split(self.final_modulation(y), 2, -1)
        h = self.final_linear(_modulate(_layer_norm(h, 1e-6), shift, scale))
        h = h.reshape(h.shape[:-2] + (hgt // p, wid // p, p, p, -1))[..., : s.keep_channels]
        return jnp.swapaxes(h, -4, -3).reshape(h.shape[:-5] + (hgt, wid, -1))

    def __call__(
        self,
        x: Array,
        t: Array,
        cond: Array | None = None,
        attention: AttentionControl | None = None,
    ) -> Array:
        """The raw network output.

        Args:
          x: (b, H, W, C) latents with H = W = sample_size.
          t: (b,) or scalar timestep in the model's convention (module docstring).
          cond: (b,) int labels, or (b, D) float class embeddings used in place of the
            table; ignored when num_classes = 0 (unconditional model).
          attention: AttentionControl with one entry per block, or None.

        Returns:
          (b, H, W, out_channels) for DiT (eps then variance), (b, H, W, C) for SiT.
        """
        s = self.s
        if attention is not None and attention.num_layers not in (0, s.num_layers):
            raise ValueError(
                f"attention control has {attention.num_layers} layers, the model {s.num_layers}"
            )
        h, y = self.embed(x, t, cond)
        if s.scan:
            h, _ = self.blocks(h, y, attention)
        else:
            for i, block in enumerate(self.blocks):
                h, _ = block(h, y, None if attention is None else attention.layer(i))
        return self.head(h, y, x.shape)


def dit_module(config: dict) -> DiT:
    """The Flax module a config dict describes."""
    return DiT(Spec.from_config(config))


def _dummy(config: dict):
    n = int(config["sample_size"])
    x = jnp.zeros((1, n, n, int(config["in_channels"])), jnp.float32)
    return x, jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.int32)


def init_params(config: dict, rng: Array) -> dict:
    """Random params (unboxed); pos_embed holds the sin-cos table."""
    return nn.meta.unbox(dit_module(config).init(rng, *_dummy(config))["params"])


def abstract_params(config: dict) -> dict:
    """The params' shapes and dtypes (jax.ShapeDtypeStruct), without allocating them."""
    return jax.eval_shape(lambda rng: init_params(config, rng), jax.random.key(0))


def param_axes(config: dict) -> dict:
    """The logical axis names (jax.sharding.PartitionSpec) of every param."""
    boxed = jax.eval_shape(
        lambda rng: dit_module(config).init(rng, *_dummy(config)), jax.random.key(0)
    )
    return nn.get_partition_spec(boxed)["params"]


def count_params(config: dict) -> int:
    """Number of parameters including the fixed pos_embed (as DiT's published counts)."""
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(abstract_params(config)))


def _block_names(config: dict | int) -> list[str]:
    n = config if isinstance(config, int) else int(config["num_layers"])
    return [f"blocks_{i}" for i in range(n)]


def stack_blocks(params: dict, config: dict | int) -> dict:
    """Unscanned params (blocks_0 ..) -> scanned ones (blocks, leading layer axis), for
    a config (or its number of layers)."""
    return stack_groups(params, [("blocks", _block_names(config))])


def unstack_blocks(params: dict, config: dict | int) -> dict:
    """Scanned params -> unscanned ones (inverse of ``stack_blocks``)."""
    return unstack_groups(params, [("blocks", _block_names(config))])


class DiTDenoiser:
    """``denoiser(x, t, cond, attention=None)`` of erg_jax's interface, params bound.

    Attributes:
      config: the config dict; params: the Flax params; num_layers: attention layers;
      layout: its blocks as layer targets name them ("blocks.12").
    """

    def __init__(self, config: dict, params: Any):
        self.config = dict(config)
        self.params = params
        self.module = dit_module(self.config)
        self.num_layers = int(self.config["num_layers"])
        self.layout = layout(self.config)

    def __call__(
        self, x: Array, t: Array, cond: Array | None, attention: AttentionControl | None = None
    ) -> Array:
        """See ``DiT.__call__``; x (b, H, W, C) -> (b, H, W, out)."""
        return self.module.apply({"params": self.params}, x, t, cond, attention)

    def with_attention_map(
        self, x: Array, t: Array, cond: Array | None, attention: AttentionControl
    ) -> tuple[Array, Array]:
        """The output and the received-attention map of the layers ``attention.capture``
        weights (``erg_jax.sag``): (b, H, W, out) and (b, H/p, W/p) on the token grid."""
        if attention.capture is None:
            raise ValueError("with_attention_map needs a control whose capture is set")
        out, state = self.module.apply(
            {"params": self.params}, x, t, cond, attention, mutable=["intermediates"]
        )
        p = self.module.s.patch
        grid = (x.shape[0], x.shape[1] // p, x.shape[2] // p)
        return out, captured_map(state, x.shape[0]).reshape(grid)

    def with_entropy(
        self, x: Array, t: Array, cond: Array | None, attention: AttentionControl
    ) -> tuple[Array, Array]:
        """The output and every block's attention entropy at the temperatures of
        ``attention.probe`` (``control.sow_entropy``): (b, H, W, out), (L, T, b, h)."""
        if attention.probe is None:
            raise ValueError("with_entropy needs a control whose probe is set")
        out, state = self.module.apply(
            {"params": self.params}, x, t, cond, attention, mutable=["intermediates"]
        )
        return out, probed_entropy(state)

    def with_emag(
        self, x: Array, t: Array, cond: Array | None, attention: AttentionControl
    ) -> tuple[Array, tuple[Array, Array]]:
        """The output under EMAG-Q (``attention.emag``, ``erg_jax.emag``) and every block's
        updated EMA of its queries and delta: (b, H, W, out), ((L, b, N, h, d), (L, b));
        a block that does not accumulate returns its E unchanged and delta 0."""
        if attention.emag is None:
            raise ValueError("with_emag needs a control whose emag is set")
        out, state = self.module.apply(
            {"params": self.params}, x, t, cond, attention, mutable=["intermediates"]
        )
        return out, sown_state(state["intermediates"])

    def query_shape(self, x: Array) -> tuple[int, int, int]:
        """(N, heads, head_dim) of every block's queries for latents x (b, H, W, C)."""
        s = self.module.s
        return (x.shape[1] // s.patch) * (x.shape[2] // s.patch), s.heads, s.hidden // s.heads

    def embed_classes(self, labels: Array) -> Array:
        """The (b, D) class embeddings of labels (b,), for annealing them (CADS)."""
        table = self.params["class_embed"]["embedding"]
        return jnp.take(table, jnp.asarray(labels, jnp.int32), axis=0).astype(self.module.s.dtype)

    def branched(self, x: Array, t: Array, cond: Any, controls: AttentionControl | None) -> Array:
        """Outputs (B, b, H, W, out) of B branches sharing x, t, cond, differing in stacked
        controls (leaves (B, L); None: B = 1); the prefix runs once (``shared_prefix``)."""
        s, p = self.module.s, self.params
        h, y = self.module.apply({"params": p}, x, t, cond, method=DiT.embed)
        block = Block(s, (x.shape[1] // s.patch, x.shape[2] // s.patch))
        blocks = p["blocks"] if s.scan else [p[f"blocks_{i}"] for i in range(s.num_layers)]
        run = Layers(lambda q, h, c: block.apply({"params": q}, h, y, c)[0], blocks, s.scan)
        hb = branched_layers(h, [run], controls)
        return self.module.apply({"params": p}, hb, y, x.shape, method=DiT.head)


def make_denoiser(config: dict, params: Any) -> DiTDenoiser:
    """The DiT / SiT denoiser of a config dict and its params."""
    if config.get("kind") != "dit":
        raise ValueError(
            f"make_denoiser of models.dit needs kind='dit', got {config.get('kind')!r}"
        )
    return DiTDenoiser(config, params)
