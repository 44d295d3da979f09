"""Converts a PyTorch / diffusers checkpoint into an erg_jax checkpoint (Orbax + config).

    python -m launch.convert --source=dit-pt --input=DiT-XL-2-512x512.pt \\
        --output=ckpt/dit-xl-2-512
    python -m launch.convert --source=dit-pt --input=DiT-XL-2-256x256.pt \\
        --output=ckpt/dit-xl-2-256 --model=XL/2 --sample_size=32   # both checked
    python -m launch.convert --source=dit-pt --model=SiT --input=SiT-XL-2-256x256.pt \\
        --output=ckpt/sit-xl-2-256
    python -m launch.convert --source=diffusers-dit --input=DiT-XL-2-256/transformer \\
        --output=ckpt/dit-xl-2-256-diffusers
    python -m launch.convert --source=diffusers-sd3 --input=sd3.5-medium/transformer \\
        --output=ckpt/sd35m
    python -m launch.convert --source=diffusers-flux --input=FLUX.1-dev/transformer \\
        --output=ckpt/flux-dev
    python -m launch.convert --source=diffusers-vae --input=sd-vae-ft-ema --output=ckpt/vae
    python -m launch.convert --source=diffusers-wan --input=wan-1.3b/transformer \
        --output=ckpt/wan-1.3b --scan_blocks
    python -m launch.convert --source=diffusers-wan-vae --input=wan-1.3b/vae --output=ckpt/wan-vae

Sources: dit-pt (original DiT / SiT .pt: the architecture, 256px or 512px included, is
read off the tensors; --model only names the family, a name starting with "SiT" meaning
SiT, and any size in it such as XL/2 must be the file's, as must --sample_size),
every model kind's diffusers transformer (diffusers-dit, diffusers-sd3, diffusers-flux,
diffusers-wan) and the VAEs (diffusers-vae, diffusers-wan-vae). The output directory is what
``erg_jax.models.load_denoiser`` and ``erg_jax.checkpoint.restore`` read.
"""

from __future__ import annotations

import json

from absl import app, flags

from erg_jax.models import registry

from . import logs

VAE_SOURCES = ("diffusers-vae", "diffusers-wan-vae")
# every model kind's converters (erg_jax/models/registry.py), then the VAEs
SOURCES = tuple(c.source for c in registry.converters().values()) + VAE_SOURCES


def convert(
    source: str,
    input_path: str,
    output: str,
    *,
    model: str | None = None,
    sample_size: int | None = None,
    scan_blocks: bool = False,
    param_dtype: str = "float32",
) -> dict:
    """Converts one checkpoint and writes it with ``erg_jax.checkpoint.save``.

    Args:
      source: one of SOURCES.
      input_path: the .pt file (dit-pt) or the diffusers model folder.
      output: the checkpoint directory to write.
      model: dit-pt only, optional: the family, "DiT" (default) or "SiT" (any name
        starting with "SiT"); a name with a size ('XL/2', 'SiT-XL/2') is also checked
        against the file's depth, width and patch.
      sample_size: dit-pt only, optional: the latent side the file must have (32 for
        256px, 64 for 512px); the file's is used either way.
      scan_blocks: DiT, SD3 and FLUX: store the blocks stacked for ``nn.scan``.
      param_dtype: DiT, SD3, FLUX and the VAE: dtype the params are stored in.

    Returns:
      The config written beside the params.

    Raises:
      ValueError: an unreadable or mismatched checkpoint; for dit-pt, a --model or
        --sample_size that disagrees with the file (naming the field and both values).
    """
    from erg_jax import checkpoint
    from erg_jax.convert.pipeline import convert_component

    if source not in SOURCES:
        raise ValueError(f"unknown --source {source!r}; choose one of {', '.join(SOURCES)}")
    settings = dict(param_dtype=param_dtype)
    if source not in VAE_SOURCES:
        settings["scan_blocks"] = scan_blocks
    if source == "dit-pt":
        settings["family"] = model or "DiT"
        if sample_size:
            settings["sample_size"] = int(sample_size)
    params, config = convert_component(source, input_path, settings)
    checkpoint.save(output, checkpoint.to_host_device(params), config)
    return config


FLAGS = flags.FLAGS
flags.DEFINE_string("source", None, f"checkpoint kind: {', '.join(SOURCES)}")
flags.DEFINE_string("input", None, "the .pt file or the diffusers model folder")
flags.DEFINE_string("output", None, "checkpoint directory to write")
flags.DEFINE_string(
    "model",
    None,
    "dit-pt, optional: the family (a name starting with SiT means SiT, else DiT); a size "
    "in it (XL/2, SiT-XL/2) must be the file's. The architecture is read off the file",
)
flags.DEFINE_integer(
    "sample_size", None, "dit-pt, optional: latent side the file must have (32: 256px, 64: 512px)"
)
flags.DEFINE_bool("scan_blocks", False, "DiT, SD3, FLUX: store blocks stacked for nn.scan")
flags.DEFINE_string("param_dtype", "float32", "DiT, SD3, FLUX, VAE: dtype of the stored params")


def main(argv):
    del argv
    logs.set_up()
    for name in ("source", "input", "output"):
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is required")
    config = convert(
        FLAGS.source,
        FLAGS.input,
        FLAGS.output,
        model=FLAGS.model,
        sample_size=FLAGS.sample_size,
        scan_blocks=FLAGS.scan_blocks,
        param_dtype=FLAGS.param_dtype,
    )
    print(json.dumps(config, indent=2, sort_keys=True, default=str))


if __name__ == "__main__":
    app.run(main)
