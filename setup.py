"""erg-jax: Entropy Rectifying Guidance for diffusion and flow transformers in JAX."""

from setuptools import find_packages, setup

LAUNCHERS = ("sample", "quickstart", "train", "convert", "quality", "entropy", "report",
             "benchmark", "evaluate")  # fmt: skip

setup(
    name="erg-jax",
    version="0.1.0",
    description="Entropy Rectifying Guidance (ERG) and guidance baselines in JAX/Flax",
    # Every top-level name in site-packages is erg-jax's own: the checkout's launch/,
    # configs/ and models/ (15 MB of shipped weights, found by erg_jax.shipped_models) install
    # as erg_jax_launch, erg_jax_configs and the data-only erg_jax_models, never under the
    # generic names a checkout runs them by (python -m launch.sample --config=configs/...).
    packages=find_packages(include=["erg_jax", "erg_jax.*"])
    + ["erg_jax_launch", "erg_jax_configs", "erg_jax_models"],
    package_dir={
        "erg_jax_launch": "launch",
        "erg_jax_configs": "configs",
        "erg_jax_models": "models",
    },
    package_data={"erg_jax_models": ["**/*"]},
    # Installed, `python -m launch.X` is the command `erg-jax-X`, and a --config of
    # configs/NAME.py not on disk names the installed copy (launch/__init__.py).
    entry_points={
        "console_scripts": [f"erg-jax-{name}=erg_jax_launch:{name}_command" for name in LAUNCHERS]
    },
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
        "imageio-ffmpeg",  # H.264 MP4s of video samples, with its own ffmpeg binary
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "ruff==0.17.6"],
        # accelerate: diffusers' WanPipeline.from_pretrained needs it
        "parity": [
            "torch==2.13.0",
            "diffusers",
            "transformers",
            "accelerate",
            "prdc",
            "kornia",
            "torchmetrics",
        ],  # fmt: skip
        "notebook": ["nbclient", "nbformat", "ipykernel", "matplotlib"],
    },
)
