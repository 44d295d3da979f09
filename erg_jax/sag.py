"""Self-attention guidance (SAG; Hong et al. 2023, "Improving Sample Quality of Diffusion
Models Using Self-Attention Guidance", its guidance of eq. 16) for transformers.

SAG's weak branch is the network on a degraded input. From the strong branch's
self-attention in one chosen layer, every image token gets the attention it receives,

    r_j = sum_i mean_heads softmax_j(beta q_i . k_j)          i, j image tokens

and the tokens with r_j above its mean over j are masked (pure self-attention: r_j > 1,
as the reference). The mask, grown from tokens to the latent pixels of their patches,
selects where the strong x0 estimate is blurred (Gaussian, kernel 9, sigma 1), and the
result is noised back to the current level with the strong branch's own noise estimate:

    x0' = M * blur(x0_s) + (1 - M) * x0_s
    x_t' = a x0' + s eps_s  =  x_t + a (x0' - x0_s)            (x_t = a x0_s + s eps_s)

The weak prediction D(x_t', c) is read as if at x_t, so the guided x0 estimate
D_s + (w - 1)(D_s - D_w) is the reference's sum of raw outputs, noise_pred +
s (noise_pred - degraded_pred) with s = w - 1, in any parameterisation.

Transformers in place of the paper's U-Net: the layer is any block (default the middle
one), the map is the block's attention over its image tokens (an MMDiT's joint attention:
its image-query / image-key block, text keys kept in the softmax), a token stands for its
patch of latent pixels. The weak branch needs the strong one's output, so SAG runs two
forwards one after the other, not one batched pair: its weak branch is a staged one,
run by the sampler through the guider's ``strong_pass`` and ``staged_inputs``, which call
this module's functions of those names.

A model takes part through ``control.capture_received`` in its attention and a
``with_attention_map`` on its denoiser (the DiT, the MMDiT and FLUX.1, which passes its
image slice, text first, and returns the map on its packed 2x2 grid; docs/INTERFACES.md).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from erg_jax.control import AttentionControl

Array = jax.Array
KERNEL_SIZE = 9  # the reference's blur; its sigma is the guider's (default 1.0)


def token_mask(received: Array) -> Array:
    """Tokens receiving more attention than the mean over tokens, (b, ...) -> bool.

    Args:
      received: (b, gh, gw) the map on the token grid (any trailing shape).
    """
    axes = tuple(range(1, received.ndim))
    return received > jnp.mean(received, axis=axes, keepdims=True)


def pixel_mask(tokens: Array, shape: tuple[int, int]) -> Array:
    """A token mask grown to the latent pixels: each token covers its patch (nearest
    upsampling by an integer factor, the reference's interpolation).

    Args:
      tokens: (b, gh, gw) bool.
      shape: (H, W) the latents' size, multiples of (gh, gw).

    Returns:
      (b, H, W, 1) bool.
    """
    (gh, gw), (hgt, wid) = tokens.shape[1:], shape
    if hgt % gh or wid % gw:
        raise ValueError(f"sag: latents {shape} are not whole patches of the {gh}x{gw} token grid")
    grown = jnp.repeat(jnp.repeat(tokens, hgt // gh, axis=1), wid // gw, axis=2)
    return grown[..., None]


def gaussian_blur(x: Array, sigma: Any = 1.0, kernel_size: int = KERNEL_SIZE) -> Array:
    """Gaussian blur of every channel of NHWC images, reflect-padded (the reference's
    ``gaussian_blur_2d``: taps at -(k-1)/2 .. (k-1)/2, normalised, one 2-D kernel
    applied here as two 1-D passes).

    Args:
      x: (b, H, W, C).
      sigma: the Gaussian's width in pixels (traced).
      kernel_size: taps per side (static, odd).

    Returns:
      (b, H, W, C) float32. Latents no larger than half the kernel reflect repeatedly
      (the reference's padding refuses them).
    """
    half = kernel_size // 2
    taps = jnp.linspace(-half, half, kernel_size, dtype=jnp.float32)
    w = jnp.exp(-0.5 * jnp.square(taps / jnp.asarray(sigma, jnp.float32)))
    w = w / jnp.sum(w)
    out = jnp.pad(x.astype(jnp.float32), ((0, 0), (half, half), (half, half), (0, 0)), "reflect")
    hgt, wid = x.shape[1:3]
    out = sum(w[i] * out[:, i : i + hgt] for i in range(kernel_size))
    return sum(w[i] * out[:, :, i : i + wid] for i in range(kernel_size))


def degrade(x0: Array, mask: Array, sigma: Any = 1.0) -> Array:
    """x0' = blur(x0) inside the mask, x0 outside; x0 (b, H, W, C), mask (b, H, W, 1)."""
    return jnp.where(mask, gaussian_blur(x0, sigma), x0.astype(jnp.float32))


def renoise(x: Array, x0: Array, degraded: Array, a) -> Array:
    """x_t' = a x0' + s eps_s with eps_s the strong noise estimate, as x_t + a (x0' - x0).

    The two are one value (x_t = a x0 + s eps_s), but this form needs no division by s
    and returns x_t itself, bit for bit, wherever x0' = x0.

    Args:
      x: (b, H, W, C) the current x_t; x0: the strong x0 estimate; degraded: x0'.
      a: the signal coefficient of x_t (scalar or broadcastable).
    """
    out = x.astype(jnp.float32) + a * (degraded.astype(jnp.float32) - x0.astype(jnp.float32))
    return out.astype(x.dtype)


def weak_input(x: Array, x0: Array, received: Array, a, sigma: Any = 1.0) -> Array:
    """SAG's weak-branch input x_t' (module docstring) from the strong branch's outputs.

    Args:
      x: (b, H, W, C) x_t; x0: (b, H, W, C) the strong x0 estimate.
      received: (b, gh, gw) the captured attention map on the token grid.
      a: x_t's signal coefficient; sigma: the blur's width.
    """
    mask = pixel_mask(token_mask(received), x.shape[1:3])
    return renoise(x, x0, degrade(x0, mask, sigma), a)


def capture_weights(layer, num_layers: int) -> Array:
    """(num_layers,) float32 weights of each layer's map: one-hot at ``layer``.

    Args:
      layer: None (the middle block, num_layers // 2), a layer index (traced or not),
        or per-layer weights (num_layers,) (a one-hot; all zeros captures nothing).
    """
    if layer is None:
        layer = num_layers // 2
    layer = jnp.asarray(layer)
    if layer.shape == (num_layers,):
        return layer.astype(jnp.float32)
    if layer.ndim:
        raise ValueError(
            f"sag layer must be an index or weights ({num_layers},), got shape {layer.shape}"
        )
    return (jnp.arange(num_layers) == layer).astype(jnp.float32)


def strong_with_map(den, x, t, cond, control, layer, num_layers: int) -> tuple[Array, Array]:
    """The strong branch's raw output and its attention map in the chosen layer.

    Args:
      den: a denoiser with ``with_attention_map(x, t, cond, control) -> (out, (b, gh,
        gw))`` (DiT, MMDiT); control: the branch's AttentionControl or None.
      layer: as ``capture_weights``.
    """
    if not hasattr(den, "with_attention_map"):
        raise ValueError(
            "sag needs a denoiser with with_attention_map(x, t, cond, control) (the DiT and "
            f"MMDiT denoisers have one); got {type(den).__name__}"
        )
    weights = capture_weights(layer, num_layers)
    control = AttentionControl() if control is None else control
    return den.with_attention_map(x, t, cond, control.replace(capture=weights))


def strong_pass(guider, den, x, t, cond, control, num_layers: int) -> tuple[Array, Array]:
    """``Guider.strong_pass``: the strong branch with the map its SAG term reads (the
    first one's; ``check_sag`` allows one).

    Returns:
      The raw output, and the map (b, gh, gw) on the token grid.
    """
    term = next(term for term in guider.terms if term.uses_sag)
    return strong_with_map(den, x, t, cond, control, term.sag_layer, num_layers)


def staged_inputs(guider, x: Array, x0: Array, received: Array, a) -> list[Array]:
    """``Guider.staged_inputs``: x_t' of every SAG term, in the order of its terms."""
    return [weak_input(x, x0, received, a, t.sag_sigma) for t in guider.terms if t.uses_sag]


def check_sag(guider, denoisers) -> None:
    """Refuses what SAG cannot do: more than one SAG term (one captured map per step), the
    weak-branch cache (its weak input is built from the current strong output), and a
    strong denoiser that cannot return its attention map."""
    terms = [t for t in guider.terms if t.uses_sag]
    if not terms:
        return
    if len(terms) > 1:
        raise ValueError(f"{guider.name}: at most one sag term per guider, got {len(terms)}")
    if guider.cache is not None:
        raise ValueError(
            f"{guider.name}: sag cannot use the weak-branch cache: its weak input is built "
            "from the current step's strong output"
        )
    if not hasattr(denoisers[0], "with_attention_map"):
        raise ValueError(
            f"{guider.name}: sag needs a denoiser with with_attention_map (DiT, MMDiT); "
            f"got {type(denoisers[0]).__name__}"
        )
