"""Sampling a demo model's held-out set with a guider and scoring the images: the
quality bench's rows (``erg_jax.jobs.quality``) and the negative-prompt bench's
(``erg_jax.jobs.negative``)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from erg_jax import data, metrics
from erg_jax import guidance as G
from erg_jax import predictions as P
from erg_jax import samplers as S


class Scorer:
    """Samples guiders on one set of held-out conditions from fixed noise and scores them.

    Compiles once per pytree structure and leaf shapes of (guider, conditions); every
    number in them is traced, so a sweep of weights or ERG settings reuses one program.
    """

    def __init__(self, model, classifier, config, *, start: int, seed: int):
        n = config.num_samples
        self.model, self.classifier, self.nearest_k = model, classifier, config.nearest_k
        self.steps = config.steps
        self.real_feats = classifier(data.split("heldout", config.num_real)["images"])["features"]
        self.cond_set = data.split("heldout", n, start=start)
        self.keys = S.sample_keys(seed, jnp.arange(n))
        self.noise = S.initial_noise(self.keys, model.latent_shape)
        self.smp = S.make_sampler("euler", config.steps, time=model.time)
        self.compiled: dict = {}

    def conditions(self, guider: G.Guider, unconditional=False) -> dict:
        """The condition slots of the tuning or bench set, tempered at the guider's tau_c."""
        tau_c = G.tempered_tau_c(guider)
        return self.model.conditions(self.cond_set, unconditional=unconditional, tau_c=tau_c)

    def sample(self, guider: G.Guider, conds: dict) -> tuple[np.ndarray, float]:
        """The guider's images of the set's noise and conditions, and the seconds they
        took (compile excluded)."""
        model = self.model
        guider = G.resolve_targets(guider, model.layout)  # block names, NAG's alpha
        if guider.cads is not None and model.embed_conditions:  # CADS anneals embeddings
            conds = model.embed_conditions(model.denoiser, conds)
        leaves, tree = jax.tree_util.tree_flatten((guider, conds))
        sig = (tree, tuple(np.shape(x) for x in leaves))  # layer sets differ in length
        if sig not in self.compiled:  # compile apart from the timed run
            fn = jax.jit(
                lambda g, c: S.sample(
                    model.denoiser,
                    self.noise,
                    c,
                    g,
                    self.smp,
                    keys=self.keys,
                    num_layers=model.num_layers,
                )
            )
            self.compiled[sig] = fn.lower(guider, conds).compile()
        start = time.perf_counter()
        images = np.asarray(jax.block_until_ready(self.compiled[sig](guider, conds)))
        return images, time.perf_counter() - start

    def score(self, guider: G.Guider, conds: dict) -> dict:
        """fd, kid, precision, recall, density, coverage, consistency (and shape / colour
        accuracy), nfe, seconds."""
        images, seconds = self.sample(guider, conds)
        read = self.classifier(np.clip(images, -1.0, 1.0))
        row = metrics.compute_metrics(
            self.real_feats,
            read["features"],
            self.nearest_k,
            predictions=(read["shape"], read["colour"]),
            conditions=(self.cond_set["shape"], self.cond_set["colour"]),
        )
        row.update(nfe=forwards(guider, self.smp), seconds=seconds)
        return row


def bench_guider(method: str, weight: float, guidance: dict) -> G.Guider:
    """A bench row's guider: ``guidance.make_guider`` at the row's weight, with the
    config's guidance sections (the same sections as a sampling job's)."""
    return G.make_guider(method, scale=float(weight), **guidance)


def forwards(guider: G.Guider, sampler: S.Sampler) -> int:
    """Denoiser forwards per sample of an Euler run: the strong branch every step, each
    weak branch at every step or, under a cache, at the steps that refresh it."""
    steps = sampler.steps
    if guider.cache is None:
        return guider.num_branches * steps
    grid = sampler.grid if sampler.grid is not None else P.flow_grid(steps, sampler.shift)
    c, count, weak = guider.cache, 0, 0
    lo, hi, every = np.float32(c.t_min), np.float32(c.t_max), int(c.every)
    for t in np.asarray(grid, np.float32)[:-1]:
        inside = bool(lo <= t <= hi)
        weak += int(not inside or count % every == 0)
        count = count + 1 if inside else 0
    return steps + weak * len(guider.terms)
