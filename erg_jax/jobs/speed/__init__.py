"""The speed benchmark's parts: the pieces of ``python -m launch.benchmark`` beyond
attention (``erg_jax.jobs.benchmark``).

``setups`` builds the benchmarked models, conditions and guiders; ``guidance`` times a
sampling step per guidance method, its FLOP floor and bfloat16; ``sampler`` the scan,
its compile time and a sweep's compiles; ``peer`` the same DiT in diffusers (PyTorch);
``features`` the evaluation's feature networks (Inception-v3, DINOv2) in images per second;
``nag`` NAG's step against none and CFG on an MMDiT and a FLUX.1.
"""
