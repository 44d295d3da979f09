"""erg-jax: Entropy Rectifying Guidance for diffusion and flow transformers in JAX."""

from setuptools import find_packages, setup

setup(
    name="erg-jax",
    version="0.1.0",
    description="Entropy Rectifying Guidance (ERG) and guidance baselines in JAX/Flax",
    packages=find_packages(include=["erg_jax", "erg_jax.*", "launch", "configs"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "transformers>=4.40",
        "numpy",
        "absl-py",
        "safetensors",
        "pillow",
        "scipy",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "ruff==0.17.6"],
        "parity": ["torch==2.13.0", "diffusers", "transformers", "prdc", "kornia"],
        "notebook": ["nbclient", "nbformat", "ipykernel", "matplotlib"],
    },
)
