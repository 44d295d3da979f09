"""Checkpoint conversion: PyTorch / safetensors state dicts -> Flax params."""

from erg_jax.convert.common import StateDict, find_weights, read_config, read_state_dict

__all__ = ["StateDict", "find_weights", "read_config", "read_state_dict"]
