"""Peak host memory of converting a published-size SD3 transformer, and its seconds.

Writes a diffusers ``transformer/`` folder (config.json + safetensors) of the SD3.5-medium
shape with random weights in the stored dtype asked for, then converts it in a fresh
process per target dtype through the same path ``model.pretrained`` takes
(``erg_jax.convert.pipeline.converted``), and reports each process's peak resident
memory (ru_maxrss) and wall time beside the file and parameter sizes:

    .venv/bin/python scripts/measure_pretrained.py --out=out/measure_pretrained.json
    .venv/bin/python scripts/measure_pretrained.py --preset=sd3-medium --stored=float32
    .venv/bin/python scripts/measure_pretrained.py --pipeline=DIR --config=configs/sd3.py:medium

With --pipeline, it instead times ``launch.sample`` on that pipeline folder twice in one
fresh workdir: seconds to the first image with the conversion, then with it reused.

Nothing here needs torch. The folder is written once under --scratch and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torch_shape(path: tuple, shape: tuple) -> tuple:
    """The diffusers tensor's shape for one of our params (the inverse of the converter)."""
    if path == ("pos_embed",):
        return (1,) + tuple(shape)
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-1] == "kernel":
        return tuple(reversed(shape))
    return tuple(shape)


def write_folder(folder: str, preset: str, stored: str) -> int:
    """A diffusers SD3 transformer folder with random weights; returns the param count."""
    import ml_dtypes
    import numpy as np
    from flax import traverse_util
    from safetensors.numpy import save_file

    from erg_jax.convert.sd3 import _ARCH_FIELDS, diffusers_key
    from erg_jax.models import mmdit

    config = mmdit.mmdit_config(preset)
    flat = traverse_util.flatten_dict(mmdit.abstract_params(dict(config, scan_blocks=False)))
    count = sum(int(np.prod(leaf.shape)) for leaf in flat.values())
    if os.path.isfile(os.path.join(folder, "config.json")):
        return count
    os.makedirs(folder, exist_ok=True)
    dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[stored]
    rng = np.random.default_rng(0)
    tensors = {
        diffusers_key(path): (
            0.02 * rng.standard_normal(_torch_shape(path, leaf.shape), np.float32)
        ).astype(dtype)
        for path, leaf in flat.items()
    }
    if stored == "bfloat16":  # safetensors.numpy cannot write bfloat16: store its bytes as such
        _save_bf16(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    else:
        save_file(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    raw = {k: config[k] for k in _ARCH_FIELDS}
    raw.update(
        _class_name="SD3Transformer2DModel",
        out_channels=config["out_channels"],
        dual_attention_layers=list(config["dual_attention_layers"]),
        qk_norm=config["qk_norm"],
    )
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f)
    return count


def _save_bf16(tensors: dict, path: str) -> None:
    """A safetensors file of bfloat16 tensors: header, then the raw bytes."""
    import struct

    header, offset = {}, 0
    for key, arr in tensors.items():
        header[key] = {
            "dtype": "BF16",
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for arr in tensors.values():
            f.write(arr.tobytes())


def convert_once(folder: str, cache: str, param_dtype: str) -> None:
    """Run in a child process: the conversion, then its peak RSS and seconds as JSON."""
    t0 = time.perf_counter()
    from erg_jax.convert import pipeline

    pipeline.converted("diffusers-sd3", folder, cache, param_dtype=param_dtype, scan_blocks=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_bytes": peak}))


def first_image(args, extra: list[str]) -> None:
    """Seconds to the first image from a pipeline folder, converting and then reusing."""
    work = os.path.join(args.scratch, "first-image")
    subprocess.run(["rm", "-rf", work], check=True)
    rows = []
    for run in ("first (converts)", "second (reuses)"):
        out = os.path.join(work, run.split()[0])
        cmd = [
            sys.executable,
            "-m",
            "launch.sample",
            f"--config={args.config}",
            f"--workdir={out}",
            f"--config.model.pretrained={args.pipeline}",
            f"--config.model.cache_dir={os.path.join(work, 'cache')}",
            "--config.output.progress=False",
            *extra,
        ]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=dict(os.environ))
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        rows.append(
            dict(
                run=run,
                seconds_to_first_image=summary["seconds_to_first_image"],
                process_seconds=time.perf_counter() - t0,
                conversions=summary["conversions"],
            )
        )
        print(json.dumps(rows[-1]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="sd3.5-medium")
    ap.add_argument("--stored", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--targets", default="bfloat16,float32")
    ap.add_argument("--scratch", default="/tmp/erg_measure")
    ap.add_argument("--out", default="")
    ap.add_argument("--pipeline", default="", help="time launch.sample on this folder")
    ap.add_argument("--config", default="configs/sd3.py:medium")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args, extra = ap.parse_known_args()
    if args.child:
        convert_once(*args.child)
        return
    if args.pipeline:
        first_image(args, extra)
        return
    sys.path.insert(0, ROOT)
    folder = os.path.join(args.scratch, f"{args.preset}-{args.stored}", "transformer")
    t0 = time.perf_counter()
    count = write_folder(folder, args.preset, args.stored)
    print(f"folder ready in {time.perf_counter() - t0:.0f}s: {count / 1e9:.2f}B params")
    size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
    rows = []
    for target in args.targets.split(","):
        cache = os.path.join(args.scratch, f"cache-{args.preset}-{args.stored}-{target}")
        subprocess.run(["rm", "-rf", cache], check=True)
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
        res = subprocess.run(
            [sys.executable, __file__, "--child", folder, cache, target],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row.update(preset=args.preset, stored=args.stored, target=target)
        row.update(params=count, file_bytes=size, target_bytes=count * (2 if "16" in target else 4))
        rows.append(row)
        print(
            f"{args.preset} stored {args.stored} -> {target}: peak RSS "
            f"{row['peak_rss_bytes'] / 2**30:.2f} GiB (params in target dtype "
            f"{row['target_bytes'] / 2**30:.2f} GiB), {row['seconds']:.0f}s"
        )
        subprocess.run(["rm", "-rf", cache], check=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
