"""erg-jax: Entropy Rectifying Guidance for diffusion and flow transformers in JAX."""

from setuptools import find_packages, setup

setup(
    name="erg-jax",
    version="0.1.0",
    description="Entropy Rectifying Guidance (ERG) and guidance baselines in JAX/Flax",
    # The shipped demo weights (models/, 15 MB) travel in the wheel as the data-only
    # package erg_jax_models; erg_jax.demo_models finds them outside a checkout.
    packages=find_packages(include=["erg_jax", "erg_jax.*", "launch", "configs"])
    + ["erg_jax_models"],
    package_dir={"erg_jax_models": "models"},
    package_data={"erg_jax_models": ["**/*"]},
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
