"""Converts a PyTorch / diffusers checkpoint into an erg_jax checkpoint (Orbax + config).

    python -m launch.convert --source=dit-pt --model=XL/2 --input=DiT-XL-2-256x256.pt \\
        --output=ckpt/dit-xl-2-256
    python -m launch.convert --source=dit-pt --model=SiT-XL/2 --input=SiT-XL-2-256.pt \\
        --output=ckpt/sit-xl-2-256
    python -m launch.convert --source=diffusers-dit --input=DiT-XL-2-256/transformer \\
        --output=ckpt/dit-xl-2-256-diffusers
    python -m launch.convert --source=diffusers-sd3 --input=sd3.5-medium/transformer \\
        --output=ckpt/sd35m
    python -m launch.convert --source=diffusers-vae --input=sd-vae-ft-ema --output=ckpt/vae

Sources: dit-pt (original DiT / SiT .pt; needs --model, and --sample_size for 512px
models), diffusers-dit, diffusers-sd3, diffusers-vae. The output directory is what
``erg_jax.models.load_denoiser`` and ``erg_jax.checkpoint.restore`` read.
"""

from __future__ import annotations

import json

from absl import app, flags

SOURCES = ("dit-pt", "diffusers-dit", "diffusers-sd3", "diffusers-vae")


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
      model: dit-pt only: 'XL/2', 'DiT-B/4', 'SiT-XL/2', ... (.pt files carry no config).
      sample_size: dit-pt only: latent side (32 for 256px, 64 for 512px).
      scan_blocks: DiT and SD3: store the blocks stacked for ``nn.scan``.
      param_dtype: DiT and SD3: dtype the params are stored in.

    Returns:
      The config written beside the params.
    """
    from erg_jax import checkpoint

    layout_kw = dict(scan_blocks=scan_blocks, param_dtype=param_dtype)
    if source == "dit-pt":
        from erg_jax.convert.dit import convert_dit_pt
        from erg_jax.models.dit import dit_config

        if not model:
            raise ValueError("--source=dit-pt needs --model (e.g. XL/2 or SiT-XL/2)")
        if sample_size:
            layout_kw["sample_size"] = int(sample_size)
        config = dit_config(model, **layout_kw)
        params = convert_dit_pt(input_path, config)
    elif source == "diffusers-dit":
        from erg_jax.convert.dit import convert_diffusers_dit

        params, config = convert_diffusers_dit(input_path, **layout_kw)
    elif source == "diffusers-sd3":
        from erg_jax.convert.sd3 import convert_diffusers_sd3

        params, config = convert_diffusers_sd3(input_path, **layout_kw)
    elif source == "diffusers-vae":
        from erg_jax.convert.vae import convert_diffusers_vae

        params, config = convert_diffusers_vae(input_path)
    else:
        raise ValueError(f"unknown --source {source!r}; choose one of {', '.join(SOURCES)}")
    checkpoint.save(output, params, config)
    return config


FLAGS = flags.FLAGS
flags.DEFINE_string("source", None, f"checkpoint kind: {', '.join(SOURCES)}")
flags.DEFINE_string("input", None, "the .pt file or the diffusers model folder")
flags.DEFINE_string("output", None, "checkpoint directory to write")
flags.DEFINE_string("model", None, "dit-pt: model name, e.g. XL/2 or SiT-XL/2")
flags.DEFINE_integer("sample_size", None, "dit-pt: latent side (32 at 256px, 64 at 512px)")
flags.DEFINE_bool("scan_blocks", False, "DiT, SD3: store blocks stacked for nn.scan")
flags.DEFINE_string("param_dtype", "float32", "DiT, SD3: dtype of the stored params")


def main(argv):
    del argv
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
