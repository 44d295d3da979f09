"""The dry run's verdicts per memory and per chip kind, and its report as a table.

Given the report of ``dry_run.dry_run`` (the need(b) line through two compiled batches,
the job's FLOPs per sample of each method), a chip kind of peak dense bfloat16 rate P and
memory M gets

    seconds per sample per chip = FLOPs per sample / (MFU * P)
    hours = output.num_samples * sum over methods of those seconds / devices / 3600

and whether the configured batch fits M, with the line's largest batch. MFU (the share of
the peak a sampling step sustains) is assumed, not measured: ``MFU``. Pure arithmetic on
the report: nothing here compiles.
"""

from __future__ import annotations

import math

GIB = 2**30
# Assumed model-FLOP utilisation of a sampling job (large matmuls, few collectives on a
# data-parallel mesh): the estimate scales as 1 / MFU; a measured step time replaces it.
MFU = 0.4
# name: (peak dense bfloat16 TFLOP/s, memory per chip in GB), the vendors' public
# figures: cloud.google.com/tpu/docs/{v5e,v5p,v6e,v4} ("Peak compute per chip (bf16)",
# "HBM capacity"); NVIDIA's H100 SXM, H200 SXM and A100 80GB SXM datasheets (bfloat16
# Tensor Core, dense: half the with-sparsity figure). The memory is read in GiB, as
# ``dry_run_memory_gb`` is; the runtime keeps part of it.
CHIPS = {
    "TPU v5e": (197.0, 16.0),
    "TPU v5p": (459.0, 95.0),
    "TPU v6e": (918.0, 32.0),
    "TPU v4": (275.0, 32.0),
    "H100 SXM": (989.0, 80.0),
    "H200": (989.0, 141.0),
    "A100": (312.0, 80.0),
}


def verdict(report: dict, memory: float) -> dict:
    """Whether the configured batch fits ``memory`` bytes per device, and the largest batch
    (a multiple of the data axes) the line need(b) = fixed + per_sample * b says fits
    (None where it does not grow with b). Not compiled: (False, 0) where the denoiser's and
    the VAE's parameters alone exceed the memory, else (None, None)."""
    if not report["compiled"]:
        over = report["params_bytes_per_device"] + report["vae"]["bytes_per_device"] > memory
        return {"fits": False if over else None, "largest_batch_line": 0 if over else None}
    line, unit = report["fit"]["need"], report["data_parallel"]
    largest = None
    if line["per_sample"] > 0:
        largest = max(int((memory - line["fixed"]) // line["per_sample"]) // unit, 0) * unit
    return {"fits": report["compiled"][0]["need"] <= memory, "largest_batch_line": largest}


def estimate(report: dict, num_samples: int, mfu: float = MFU) -> dict:
    """Per chip kind of ``CHIPS``: seconds per sample per chip of each method at ``mfu``,
    the hours of ``num_samples`` samples of every method on the mesh's number of such
    chips (None where the FLOPs were not counted), and ``verdict`` at its memory."""
    flops = report.get("flops_per_sample")
    devices = math.prod(report["mesh"].values())
    chips = {}
    for name, (tflops, gb) in CHIPS.items():
        rate = mfu * tflops * 1e12
        seconds = None if flops is None else {m: f / rate for m, f in flops.items()}
        hours = None if seconds is None else num_samples * sum(seconds.values()) / devices / 3600
        chips[name] = {
            "peak_tflops": tflops,
            "memory_gb": gb,
            "seconds_per_sample": seconds,
            "hours": hours,
            **verdict(report, gb * GIB),
        }
    return {"mfu": mfu, "num_samples": int(num_samples), "devices": devices, "chips": chips}


def _size(n: float | None) -> str:
    """Bytes in GiB, MiB or KiB, whichever shows them as at least 1."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", GIB), ("MiB", 2**20)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _hours(h: float) -> str:
    """Hours as h, min or s, whichever shows them as at least 1."""
    if h >= 1:
        return f"{h:,.1f} h"
    return f"{h * 60:.1f} min" if h >= 1 / 60 else f"{h * 3600:.3g} s"


def _estimate_rows(report: dict) -> list[tuple[str, str]]:
    """The FLOPs per sample and one row per chip kind."""
    est, flops = report["estimate"], report.get("flops_per_sample")
    rows = []
    if flops:
        counted = ", ".join(f"{m} {f / 1e12:,.6g}" for m, f in flops.items())
        rows.append(("TFLOP per sample", f"{counted} (XLA's count, loops times their trips)"))
        rows.append(
            (
                "time: an estimate",
                f"at {est['mfu']:.0%} MFU (assumed, not measured); "
                f"{est['num_samples']:,} samples x {len(flops)} methods "
                f"on {est['devices']} chips of a kind",
            )
        )
    said = {True: "fits", False: "does not fit", None: "not compiled"}
    for name, c in est["chips"].items():
        kind = f"{name} ({c['peak_tflops']:g} TFLOP/s, {c['memory_gb']:g} GB)"
        time = ""
        if c["seconds_per_sample"]:
            mean = sum(c["seconds_per_sample"].values()) / len(c["seconds_per_sample"])
            time = f"{mean:.3g} s per sample per chip, {_hours(c['hours'])}; "
        largest = "-" if c["largest_batch_line"] is None else str(c["largest_batch_line"])
        rows.append(
            (
                kind,
                f"{time}batch {report['batch_size']} {said[c['fits']]}, "
                f"largest {largest} (the line)",
            )
        )
    return rows


def format_table(report: dict) -> str:
    """The report as an aligned table of per-device figures, then the per-chip estimate."""
    m = report["model"]
    rows = [
        ("model", f"{m['kind']} from {m['source']}, {m['num_params'] / 1e6:,.1f}M params"),
        ("param dtype", f"{m['param_dtype']}" + (", scanned blocks" if m["scan_blocks"] else "")),
        (
            "mesh",
            " ".join(f"{k}={v}" for k, v in report["mesh"].items())
            + f" ({report['devices']} devices)",
        ),
        (
            "program",
            f"{report['method']}, the method with the most branches ({report['branches']}), "
            f"{report['sampler']}",
        ),
        ("methods (branches)", ", ".join(f"{m} ({n})" for m, n in report["methods"].items())),
        (
            "denoiser params / device",
            _size(report["params_bytes_per_device"])
            + f" (replicated {_size(report['params_replicated_bytes_per_device'])}, "
            f"all devices' worth {_size(report['params_bytes_total'])})",
        ),
        (
            "VAE params / device",
            _size(report["vae"]["bytes_per_device"]) + f" ({report['vae']['source']})",
        ),
    ]
    for enc in report["text_encoders"] or []:
        rows.append(("text encoder / device", f"{_size(enc['per_device'])} ({enc['folder']})"))
    if "encoding_peak_bytes_per_device" in report:
        rows.append(("peak while encoding", _size(report["encoding_peak_bytes_per_device"])))
    for s in report["compiled"]:
        rows.append(
            (
                f"compiled at batch {s['batch']}",
                f"temp {_size(s['temp'])}, args {_size(s['arguments'])}, out {_size(s['outputs'])};"
                f" need {_size(s['need'])}; compiled in {s['compile_seconds']:.1f} s",
            )
        )
    if "fit" in report:
        t, n = report["fit"]["temp"], report["fit"]["need"]
        rows.append(("temp(b)", f"{_size(t['fixed'])} + {_size(t['per_sample'])} per sample"))
        rows.append(("need(b)", f"{_size(n['fixed'])} + {_size(n['per_sample'])} per sample"))
    said = {True: "fits", False: "does not fit", None: "not compiled"}[report["fits"]]
    unit, line = report["data_parallel"], report["largest_batch_line"]
    largest = "-" if report["largest_batch"] is None else str(report["largest_batch"])
    if report["compiled"]:
        largest += f" (largest compiled that fits; the line said {line})"
    rows += [
        ("memory / device", _size(report["memory_bytes"])),
        (f"batch {report['batch_size']} in that", said),
        (f"largest batch, x{unit}", largest),
    ]
    if "estimate" in report:
        rows += _estimate_rows(report)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
