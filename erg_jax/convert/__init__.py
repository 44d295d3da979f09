"""Checkpoint conversion: diffusers pipeline folders and PyTorch / safetensors state dicts
-> Flax params (their readers: ``erg_jax.weights``)."""
