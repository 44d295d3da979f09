"""erg-jax: Entropy Rectifying Guidance for diffusion and flow transformers in JAX."""

from erg_jax.control import AttentionControl
from erg_jax.energy import Energy, attention_entropy, energy_attention, hopfield_energy

__all__ = [
    "AttentionControl",
    "Energy",
    "attention_entropy",
    "energy_attention",
    "hopfield_energy",
]
