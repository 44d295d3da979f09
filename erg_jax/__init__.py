"""erg-jax: Entropy Rectifying Guidance for diffusion and flow transformers in JAX."""

from erg_jax.control import AttentionControl
from erg_jax.energy import Energy, attention_entropy, energy_attention, hopfield_energy

__all__ = [
    "AttentionControl",
    "Energy",
    "Pipeline",
    "attention_entropy",
    "energy_attention",
    "hopfield_energy",
    "load_denoiser",
    "load_text_encoder",
]


def __getattr__(name: str):
    # Model loaders and the Pipeline (erg_jax.pipeline) import their model code only when
    # first used: importing erg_jax loads the energy and attention control alone.
    if name == "Pipeline":
        from erg_jax.pipeline import Pipeline

        return Pipeline
    if name == "load_denoiser":
        from erg_jax.models import load_denoiser

        return load_denoiser
    if name == "load_text_encoder":
        from erg_jax.models.text import load_text_encoder

        return load_text_encoder
    raise AttributeError(f"module 'erg_jax' has no attribute {name!r}")
