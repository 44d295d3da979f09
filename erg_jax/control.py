"""Per-layer attention controls: how a guidance branch perturbs a denoiser's attention.

One control carries, for every attention layer of a model (leading axis = layer), the
perturbations the guiders of docs/METHOD.md need, all as traced data:

- ``energy`` and ``steps``: I-ERG (Energy per layer; ``steps`` energy updates, 1 = one);
- ``identity``: PAG (Ahn et al. 2024), the attention output replaced by the values;
- ``blur``: SEG (Hong 2024), queries blurred by a Gaussian of this sigma over the token
  grid (0 = off, inf = the mean of all queries);
- ``skip``: SLG, the whole block skipped (its output is its input);
- ``shuffle``: TPG (Rajabi et al. 2025), the block's update to the image tokens moved to
  other tokens by a random permutation (``image_block_output``; the seed per layer is
  data, 0 = off);
- ``capture``: SAG (``erg_jax.sag``), not a perturbation: the layer also reports the
  attention each image token receives (``capture_received``), weighted by this value
  and sown into the module's "intermediates"; 0 skips the work (``lax.cond``).
- ``probe``: a diagnostic either: the layer also reports the entropy of its attention at
  chosen temperatures (``sow_entropy``, ``EntropyProbe``), for choosing tau and layers.
- ``nag``: NAG (Chen et al. 2025, ``NAGControl``): the image rows of the layer's attention
  output are extrapolated away from those of a negative text and normalised
  (``nag_blend``). Not a weak branch: the negative text stream runs inside the same
  forward (the model doubles its text stream; cond["negative"] holds that text).
- ``emag``: EMAG-Q (Yadav et al. 2025, ``erg_jax.emag.EMAGControl``): each layer updates
  an EMA of its image queries, carried across steps, and the selected layer attends with
  it in place of its image queries (``emag.emag_queries``; the denoiser's ``with_emag``).

A field set to None is compiled out, so a guider pays only for what it uses (CFG's
controls are all None: plain attention). Layers that a guider leaves alone hold the
neutral value (Energy(), steps 1, identity 0, blur 0, skip 0), which reproduces the
plain layer exactly; choosing layers is a select on data, not a recompile.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from erg_jax.energy import Energy, attention_entropy, chunk_budget, energy_attention

Array = jax.Array


@struct.dataclass
class EntropyProbe:
    """The temperatures at which every layer reports its attention entropy.

    Attributes ((layers, ...) for a whole model, one row per layer after indexing):
      taus: (layers, T) temperatures tau > 0.
      slot: (layers, layers) one-hot rows: layer i writes its entropies into row i of a
        (layers, T, b, h) array and ``probed_entropy`` sums them, so the read-out needs
        no layer names and is the same for a loop of layers, ``nn.scan`` and runs of
        scanned blocks.
    """

    taus: Any
    slot: Any

    @classmethod
    def at(cls, taus: Any, num_layers: int) -> EntropyProbe:
        """The same temperatures (T,) in every one of num_layers layers."""
        taus = jnp.asarray(taus, jnp.float32).reshape(-1)
        return cls(
            jnp.broadcast_to(taus, (num_layers,) + taus.shape),
            jnp.eye(num_layers, dtype=jnp.float32),
        )


@struct.dataclass
class NAGControl:
    """Normalized Attention Guidance in every layer (one row per layer after indexing).

    Attributes ((layers,) for a whole model, scalars after indexing):
      scale: s, the extrapolation Z~ = s Z+ - (s - 1) Z-; 1 leaves the layer alone, exactly.
        (layers, heads) guides a subset of heads (the others hold 1).
      tau: the cap on ||Z~|| / ||Z+|| per sample and image token, over all channels.
      alpha: the blend alpha Z^ + (1 - alpha) Z+.
      norm: static, "l1" (the paper's Algorithm 1) or "l2" (the authors' FLUX processor).
    """

    scale: Any
    tau: Any
    alpha: Any
    norm: str = struct.field(pytree_node=False, default="l1")


NAG_NORMS = ("l1", "l2")


def nag_blend(pos: Array, neg: Array, control: NAGControl, heads: int) -> Array:
    """NAG's guided image rows from the positive and negative attention outputs.

    Args:
      pos, neg: (b, n, heads * head_dim) image rows of the attention output against the
        positive and the negative text (heads merged, before the output projection).
      control: this layer's NAGControl (scalars; ``scale`` (heads,) for a head subset).
      heads: the layer's number of heads.

    Returns:
      (b, n, D) alpha Z^ + (1 - alpha) Z+, Z^ = Z~ min(r, tau) / r, r = |Z~| / |Z+|,
      the norm over each token's channels; exactly pos where every scale is 1.
    """
    dtype = pos.dtype
    zp, zn = pos.astype(jnp.float32), neg.astype(jnp.float32)
    scale = jnp.asarray(control.scale, jnp.float32)
    if scale.ndim:  # per head: each head's channels
        scale = jnp.repeat(scale, zp.shape[-1] // heads)
    guided = zp * scale - zn * (scale - 1.0)
    order = 1 if control.norm == "l1" else 2
    ratio = jnp.linalg.norm(guided, ord=order, axis=-1, keepdims=True) / jnp.linalg.norm(
        zp, ord=order, axis=-1, keepdims=True
    )
    guided = guided * jnp.minimum(ratio, control.tau) / ratio
    out = guided * control.alpha + zp * (1.0 - control.alpha)
    return jnp.where(jnp.any(scale != 1.0), out, zp).astype(dtype)


@struct.dataclass
class AttentionControl:
    """Attention perturbations for every layer of a model (or, indexed, for one layer).

    Attributes (each (layers,) for a whole model, scalar after ``layer(i)``; None when
    the perturbation is compiled out):
      energy: Energy with per-layer tau, alpha, gamma.
      steps: int32 number of energy updates of each layer, 1 <= steps <= max_steps.
      identity: 1.0 where the attention is replaced by identity attention (PAG).
      blur: Gaussian sigma (in tokens) of the query blur (SEG); 0 off, inf the mean.
      skip: 1.0 where the block is skipped (SLG).
      shuffle: int32 seed of the permutation of the block's image-token update (TPG);
        0 leaves the block alone.
      capture: weight of the layer's received-attention map (SAG; one-hot over layers).
      probe: an EntropyProbe (the layer reports its attention entropy), or None.
      nag: a NAGControl (NAG against cond["negative"]), or None.
      emag: an ``erg_jax.emag.EMAGControl`` (EMAG-Q's EMA of the image queries), or None.
      max_steps: static bound of ``steps``; the energy loop runs this many times.
      energy_update: static; False when every alpha and gamma is known to be 1 before
        tracing (the paper's I-ERG: a temperature alone), so the layer skips the
        update's elementwise passes and takes the attention output as it is. A guider
        traced as data keeps True, and its alpha and gamma stay sweepable.
    """

    energy: Energy | None = None
    steps: Any = None
    identity: Any = None
    blur: Any = None
    skip: Any = None
    shuffle: Any = None
    capture: Any = None
    probe: EntropyProbe | None = None
    nag: NAGControl | None = None
    emag: Any = None
    max_steps: int = struct.field(pytree_node=False, default=1)
    energy_update: bool = struct.field(pytree_node=False, default=True)

    @classmethod
    def neutral(
        cls,
        num_layers: int,
        *,
        energy: bool = False,
        identity: bool = False,
        blur: bool = False,
        skip: bool = False,
        shuffle: bool = False,
        max_steps: int = 1,
        energy_update: bool = True,
        nag: str | None = None,
    ) -> AttentionControl:
        """A control with the chosen perturbations compiled in and switched off (nag:
        None, or NAG's norm, "l1" or "l2")."""
        ones = jnp.ones((num_layers,), jnp.float32)
        zeros = jnp.zeros((num_layers,), jnp.float32)
        return cls(
            energy=Energy(ones, ones, ones) if energy else None,
            steps=jnp.ones((num_layers,), jnp.int32) if energy and max_steps > 1 else None,
            identity=zeros if identity else None,
            blur=zeros if blur else None,
            skip=zeros if skip else None,
            shuffle=jnp.zeros((num_layers,), jnp.int32) if shuffle else None,
            nag=NAGControl(ones, ones, zeros, nag) if nag else None,
            max_steps=max_steps,
            energy_update=energy_update,
        )

    @property
    def num_layers(self) -> int:
        leaves = jax.tree_util.tree_leaves(self)
        return int(leaves[0].shape[0]) if leaves else 0

    def layer(self, i: int | Array) -> AttentionControl:
        """The control of layer i (fields become scalars)."""
        return jax.tree_util.tree_map(lambda a: a[i], self)


def blur_queries(q: Array, grid: tuple[int, int], sigma: Array) -> Array:
    """Gaussian blur of queries over their (height, width) token grid (SEG).

    The kernel is applied as two dense (H, H) and (W, W) matrices whose rows are
    normalised over the grid (no padding), so sigma is traced data: sigma -> inf gives
    every query the mean of all queries, exactly; sigma <= 0 returns q unchanged.

    Args:
      q: (b, H*W, h, d) queries in row-major grid order.
      grid: (H, W).
      sigma: scalar blur width in tokens.
    """
    hgt, wid = grid
    b, n, h, d = q.shape
    if n != hgt * wid:
        raise ValueError(f"blur grid {grid} does not cover the {n} query tokens")
    sigma = jnp.asarray(sigma, jnp.float32)
    safe = jnp.where(sigma > 0, sigma, 1.0)

    def kernel(size):
        i = jnp.arange(size, dtype=jnp.float32)
        w = jnp.exp(-jnp.square(i[:, None] - i[None, :]) / (2.0 * jnp.square(safe)))
        return w / jnp.sum(w, axis=-1, keepdims=True)

    x = q.reshape(b, hgt, wid, h, d).astype(jnp.float32)
    x = jnp.einsum("ij,bjwhd->biwhd", kernel(hgt), x)
    x = jnp.einsum("ij,bhjcd->bhicd", kernel(wid), x)
    return jnp.where(sigma > 0, x.reshape(q.shape).astype(q.dtype), q)


def attend(
    q: Array,
    k: Array,
    v: Array,
    control: AttentionControl | None = None,
    *,
    bias: Array | None = None,
    mask: Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    precision: str | jax.lax.Precision | None = None,
) -> Array:
    """Attention of one layer under its control (energy updates, identity attention).

    SEG's query blur is applied by the model before this call (``blur_queries``), since
    only the model knows which tokens lie on the image grid.

    Args:
      q, k, v: (b, n, h, d), (b, m, hk, d), (b, m, hk, d).
      control: this layer's control (``AttentionControl.layer(i)``) or None (plain).

    Returns:
      (b, n, h, d) attention output.
    """
    kw = dict(bias=bias, mask=mask, scale=scale, implementation=implementation, precision=precision)
    if control is None or control.energy is None:
        out = energy_attention(q, k, v, **kw)
    else:
        energy = control.energy if control.energy_update else Energy(tau=control.energy.tau)
        out = energy_attention(q, k, v, energy, **kw)
        for i in range(1, control.max_steps):
            nxt = energy_attention(out, k, v, energy, **kw)
            out = jnp.where(i < control.steps, nxt, out)
    if control is not None and control.identity is not None:
        groups = q.shape[2] // v.shape[2]
        ident = jnp.repeat(v, groups, axis=2) if groups > 1 else v
        if ident.shape[1] != q.shape[1]:
            raise ValueError(
                "identity attention (PAG) needs self-attention: kv length must equal q length"
            )
        on = _per_head(control.identity)
        out = jnp.where(on > 0, ident.astype(out.dtype), out)
    return out


def _per_head(value: Array) -> Array:
    """A layer's control value, scalar or per head (heads,), shaped to (b, n, h, d) arrays."""
    value = jnp.asarray(value)
    return value.reshape(1, 1, -1, 1) if value.ndim else value


def skip_block(x_in: Array, x_out: Array, control: AttentionControl | None) -> Array:
    """A block's output, or its input where the control skips the layer (SLG)."""
    if control is None or control.skip is None:
        return x_out
    return jnp.where(control.skip > 0, x_in, x_out)


def shuffle_update(x_in: Array, x_out: Array, control: AttentionControl | None) -> Array:
    """TPG's token perturbation of a block: x_in + P (x_out - x_in), P a permutation of the
    tokens (b, n, D) drawn from the layer's seed, the same for every sample; the block's
    output where the seed is 0.

    Models whose positions enter only at the input are equivariant to a token
    permutation, so shuffling a block's input and un-shuffling its output changes
    nothing, and shuffling without un-shuffling scrambles the whole prediction; moving
    the block's update to other tokens against the residual stream is the perturbation
    TPG's U-Net code amounts to (its shuffled transformer stream is added back to the
    unshuffled convolutional residual).
    """
    if control is None or control.shuffle is None:
        return x_out
    seed = jnp.asarray(control.shuffle, jnp.int32)
    perm = jax.random.permutation(jax.random.key(seed), x_in.shape[1])
    moved = x_in + jnp.take(x_out - x_in, perm, axis=1)
    return jnp.where(seed != 0, moved, x_out)


def image_block_output(x_in: Array, x_out: Array, control: AttentionControl | None) -> Array:
    """A block's image-token output under its control: TPG's shuffle, then SLG's skip."""
    return skip_block(x_in, shuffle_update(x_in, x_out, control), control)


def maybe_blur(q: Array, grid: tuple[int, int], control: AttentionControl | None) -> Array:
    """Applies SEG's query blur where the control asks for one."""
    if control is None or control.blur is None:
        return q
    sigma = jnp.asarray(control.blur)
    if not sigma.ndim:
        return blur_queries(q, grid, sigma)
    # per head: one term's sigma on its heads (the largest), the others left alone
    return jnp.where(_per_head(sigma) > 0, blur_queries(q, grid, jnp.max(sigma)), q)


def received_attention(q: Array, k: Array, image: slice | None = None, *, scale=None) -> Array:
    """The attention each image token receives from the image queries, mean over heads.

    The softmax runs over every key (an MMDiT's text keys included), then only the
    image-query / image-key block is summed. Queries are taken in chunks when the full
    logits would not fit the backend's budget, so no full attention matrix is held.

    Args:
      q: (b, n, h, d) queries; k: (b, n, hk, d) keys of the same tokens (hk divides h).
      image: the image tokens' positions in both (None: every token).
      scale: logit scale; None is 1 / sqrt(d).

    Returns:
      (b, N) float32, N image tokens; for plain self-attention its mean over j is 1.
    """
    b, n, h, d = q.shape
    img = slice(None) if image is None else image
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    keys = k.astype(jnp.float32)
    if h != k.shape[2]:  # grouped-query heads: each key head serves h / hk query heads
        keys = jnp.repeat(keys, h // k.shape[2], axis=2)
    queries = q[:, img].astype(jnp.float32)
    count = queries.shape[1]

    def part(qc):
        logits = jnp.einsum("bchd,bmhd->bhcm", qc, keys) * scale
        return jnp.sum(jnp.mean(jax.nn.softmax(logits, axis=-1)[..., img], axis=1), axis=1)

    size = _chunk(count, 4 * b * h * keys.shape[1])
    if size == count:
        return part(queries)
    chunks = jnp.moveaxis(queries.reshape(b, count // size, size, h, d), 1, 0)
    return jnp.sum(jax.lax.map(part, chunks), axis=0)


def _chunk(count: int, row_bytes: int) -> int:
    """The largest divisor of count whose float32 logits fit the budget (at least 1)."""
    target = max(1, chunk_budget() // row_bytes)
    return next(c for c in range(min(count, target), 0, -1) if count % c == 0)


def capture_received(module, q: Array, k: Array, control, image: slice | None = None) -> None:
    """Sows this layer's received-attention map (``received_attention``) times its
    ``capture`` weight as ``module``'s "intermediates"/"received", where asked.

    Call it in a layer next to ``attend`` with the same q and k. Nothing is computed
    when the field is compiled out (None) or, through a ``lax.cond``, when the layer's
    weight is 0; nothing is kept unless the caller applies the model with
    ``mutable=["intermediates"]`` (under ``nn.scan`` that collection needs a layer axis).

    Args:
      module: the Flax module of the attention (its ``sow`` stores the map).
      q, k: (b, n, h, d), (b, n, hk, d) as ``attend`` gets them.
      control: this layer's control or None.
      image: the image tokens' positions (None: every token).
    """
    if control is None or control.capture is None:
        return
    weight = jnp.asarray(control.capture, jnp.float32)
    count = q[:, slice(None) if image is None else image].shape[1]
    received = jax.lax.cond(
        weight != 0,
        lambda: weight * received_attention(q, k, image),
        lambda: jnp.zeros((q.shape[0], count), jnp.float32),
    )
    module.sow("intermediates", "received", received)


def captured_map(intermediates: Any, batch: int) -> Array:
    """The sum of every sown received map (each layer's weighted by its ``capture``).

    Args:
      intermediates: the mutable state a model's apply returned (any nesting; a scanned
        run of layers holds its maps stacked (layers, b, N)).
      batch: b.

    Returns:
      (b, N) float32.
    """
    leaves = jax.tree_util.tree_leaves(intermediates)
    if not leaves:
        raise ValueError("no attention map was captured: the control's capture is unset")
    return sum(jnp.sum(a.reshape(-1, batch, a.shape[-1]), axis=0) for a in leaves)


def sow_entropy(module, q: Array, k: Array, control) -> None:
    """Sows this layer's attention entropy at each of the probe's temperatures, where the
    control's ``probe`` asks, as ``module``'s "intermediates"/"entropy".

    The entropy at tau is ``energy.attention_entropy`` with Energy(tau) of the layer's
    own q and k: the distribution ``energy_attention`` reads the values with at that
    temperature, so the numbers are those of the guidance code. It is measured only;
    the layer's output is left as it is. One temperature at a time (``lax.map``), so
    one (b, h, n, m) attention matrix is held at once.

    Args:
      module: the Flax module of the attention.
      q, k: (b, n, h, d), (b, m, hk, d) as ``attend`` gets them (no bias, no mask).
      control: this layer's control or None.

    Sown: (layers, T, b, h) float32, the mean over queries of each head's entropy (nats)
    in this layer's row (the probe's ``slot``), zeros elsewhere.
    """
    if control is None or control.probe is None:
        return
    probe = control.probe

    def at(tau):
        return jnp.mean(attention_entropy(q, k, Energy(tau=tau)), axis=1)

    ent = jax.lax.map(at, jnp.asarray(probe.taus, jnp.float32))  # (T, b, h)
    slot = jnp.asarray(probe.slot, jnp.float32)
    module.sow("intermediates", "entropy", slot[:, None, None, None] * ent[None])


def probed_entropy(intermediates: Any) -> Array:
    """(layers, T, b, h): the sum of every sown "entropy" (each layer's in its row).

    Args:
      intermediates: the mutable state a model's apply returned (a scanned run of
        layers holds its entries stacked on a leading axis).
    """
    found = []

    def visit(tree):
        for key, value in tree.items():
            if key == "entropy":
                found.extend(value)
            elif isinstance(value, Mapping):
                visit(value)

    visit(intermediates)
    if not found:
        raise ValueError("no attention entropy was sown: the control's probe is unset")
    shape = found[0].shape[-4:]
    return sum(jnp.sum(a.reshape((-1,) + shape), axis=0) for a in found)
