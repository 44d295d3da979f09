"""Sections shared by the sampling-job configs (configs/dit.py, configs/sd3.py): the
library's settings (``erg_jax.settings``) and what a job adds."""

import ml_collections

from erg_jax import settings


def base_config(kind: str = "", recipe: str = "") -> ml_collections.ConfigDict:
    """The library's settings sections (erg_jax.settings: model, vae, text, sampler,
    guidance, mesh, ...; with ``kind``, its ``recipe`` laid over them) and the job's own."""
    c = settings.sections(kind, recipe)
    # JAX's persistent compilation cache: a restarted job loads its programs from here
    c.compile_cache_dir = ""
    # True: build abstract parameters (no weights read), compile one guided step for the
    # mesh and print per-device memory and the batch that fits dry_run_memory_gb
    c.dry_run = False
    c.dry_run_memory_gb = 16.0
    c.output = ml_collections.ConfigDict(dict(num_samples=16, grid_size=16, progress=True))
    return c
