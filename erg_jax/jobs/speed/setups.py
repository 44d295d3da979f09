"""The benchmarked models, conditions, guiders and jitted sampling steps.

Two denoisers with random weights: DiT-S/2 (Peebles & Xie 2023: 12 blocks, width 384,
6 heads, 32x32x4 latents, 256 tokens) and a small MMDiT (SD3 layout, 6 joint blocks,
width 256, 32x32x16 latents, 32 text tokens), or tiny versions of both (``small``).
Every guider runs at its usual cost-relevant settings; the perturbed layers are the
second half of the network (ERG) or its middle layer (PAG, SEG), so the branches share
the first half where they share their condition (``erg_jax.models.shared_prefix``).
The ``_cache2`` guiders evaluate their weak branch every second step (``guidance.cache``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax.models import dit, mmdit


@dataclasses.dataclass
class Setup:
    """One benchmarked model. Legend: den the denoiser; conds the condition slots;
    sampler its native sampler; num_layers L; batch b; shape a latent's (H, W, C)."""

    name: str
    den: Callable
    config: dict
    conds: dict
    sampler: S.Sampler
    num_layers: int
    batch: int
    shape: tuple

    def noise(self, batch: int | None = None) -> tuple[jax.Array, jax.Array]:
        """(keys, x_T) for the first `batch` sample indices."""
        keys = S.sample_keys(0, jnp.arange(batch or self.batch))
        return keys, S.initial_noise(keys, self.shape)

    def with_batch(self, batch: int) -> Setup:
        conds = jax.tree_util.tree_map(lambda a: a[:batch], self.conds)
        return dataclasses.replace(self, conds=conds, batch=batch)


def plain(den: Callable) -> Callable:
    """The denoiser without ``branched``: every branch through the plain vmap."""
    return lambda x, t, c, a=None: den(x, t, c, a)


def dit_setup(small: bool = False, batch: int = 8, dtype: str = "float32") -> Setup:
    """DiT-S/2 (small: a 4-block tiny DiT) with random weights, DDIM as DiT samples."""
    name, extra = ("tiny/2", dict(num_layers=4)) if small else ("S/2", {})
    cfg = dit.dit_config(name, dtype=dtype, **extra)
    return dit_from_params(cfg, dit.init_params(cfg, jax.random.key(0)), small=small, batch=batch)


def dit_from_params(cfg: dict, params: Any, *, small: bool, batch: int) -> Setup:
    """A DiT setup from a config and its params (e.g. converted from diffusers)."""
    den = dit.make_denoiser(cfg, params)
    labels = jnp.arange(batch) % cfg["num_classes"]
    conds = {"cond": labels, "null": jnp.full((batch,), cfg["num_classes"])}
    sampler = S.make_sampler("ddim", 50, learned_sigma=True)
    n, c = cfg["sample_size"], cfg["in_channels"]
    name = "DiT-tiny" if small else "DiT-S/2"
    return Setup(name, den, cfg, conds, sampler, cfg["num_layers"], batch, (n, n, c))


def mmdit_setup(small: bool = False, batch: int = 8) -> Setup:
    """A small MMDiT (small: the tiny test preset) with random weights, Euler flow."""
    if small:
        cfg = mmdit.mmdit_config("tiny", precision="default")
        tokens = 5
    else:
        width = 256
        cfg = mmdit.mmdit_config(
            "tiny",
            sample_size=32,
            in_channels=16,
            out_channels=16,
            num_layers=6,
            num_attention_heads=4,
            attention_head_dim=width // 4,
            joint_attention_dim=width,
            caption_projection_dim=width,
            pooled_projection_dim=128,
            pos_embed_max_size=32,
            dual_attention_layers=(),
            precision="default",
        )
        tokens = 32
    den = mmdit.make_denoiser(cfg, mmdit.init_params(cfg, jax.random.key(1)))
    ks = jax.random.split(jax.random.key(2), 2)
    text = {
        "context": jax.random.normal(ks[0], (batch, tokens, cfg["joint_attention_dim"])),
        "pooled": jax.random.normal(ks[1], (batch, cfg["pooled_projection_dim"])),
    }
    conds = {"cond": text, "null": jax.tree_util.tree_map(jnp.zeros_like, text)}
    sampler = S.make_sampler("euler", 28, time="sd3", shift=3.0)
    n, c = cfg["sample_size"], cfg["in_channels"]
    name = "MMDiT-tiny" if small else "MMDiT-small"
    return Setup(name, den, cfg, conds, sampler, cfg["num_layers"], batch, (n, n, c))


def guiders(num_layers: int) -> dict[str, G.Guider]:
    """The compared guidance methods (w = 4), perturbing the second half / middle layer,
    each built by ``guidance.make_guider`` as every entry point builds them."""
    late = list(range(num_layers // 2, num_layers))
    mid = [num_layers // 2]
    erg = dict(tau=0.5, layers=late, condition="cond")
    make = G.make_guider
    return {
        "none": make("none"),
        "cfg": make("cfg", scale=4.0),
        "erg": make("erg", scale=4.0, erg=erg),
        "erg_k3": make("erg", scale=4.0, erg=dict(erg, steps=3)),
        "erg_all_layers": make("erg", scale=4.0, erg=dict(erg, layers=None)),
        "erg+apg": make("erg+apg", scale=4.0, erg=erg, apg=dict(momentum=-0.5)),
        "pag": make("pag", scale=3.0, pag=dict(layers=mid)),
        "seg": make("seg", scale=3.0, seg=dict(sigma=math.inf, layers=mid)),
        "cfg_cache2": make("cfg+cache", scale=4.0, cache=dict(every=2)),
        "erg_cache2": make("erg+cache", scale=4.0, erg=erg, cache=dict(every=2)),
    }


def jitted_step(setup: Setup, guider: G.Guider, den: Callable | None = None, dtype=None):
    """The sampler's step ``(carry, i) -> carry`` jitted with the carry donated, and a
    fresh carry; the step's x is updated in place, as in a sampling loop."""
    keys, x = setup.noise()
    if dtype is not None:
        x = x.astype(dtype)
    step = S.make_step(den or setup.den, setup.conds, guider, setup.sampler, keys, setup.num_layers)
    fn = jax.jit(lambda carry, i: step(carry, i)[0], donate_argnums=0)
    carry = S.initial_carry(guider, x, den or setup.den, setup.sampler)
    return fn, carry


class Stepper:
    """A no-argument callable that advances its own carry by one donated step, walking
    the sampler's grid as a sampling loop does and starting over at its end."""

    def __init__(self, fn, carry, steps: int, per_call: int = 1):
        self.fn, self.start, self.steps, self.per_call = fn, carry, steps, per_call
        self.carry, self.index = self._fresh(), 0

    def _fresh(self):
        return jax.tree_util.tree_map(jnp.copy, self.start)

    def __call__(self):
        """``per_call`` consecutive steps (a cached guider's cycle: its time per call
        over per_call is its mean step, refreshing and reusing steps together)."""
        for _ in range(self.per_call):
            if self.index == self.steps:
                self.carry, self.index = self._fresh(), 0
            self.carry = self.fn(self.carry, jnp.int32(self.index))
            self.index += 1
        return self.carry
