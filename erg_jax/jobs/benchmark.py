"""The speed benchmark, ``python -m launch.benchmark``: times and memory as ratios.

Every comparison is taken in one run on one machine, the contenders interleaved round
by round (this machine is shared and noisy), and reported as medians. Peak memory is
XLA's own account of the compiled program (temporary buffers plus outputs). This module
holds the attention table and ``run``, which gathers every section (the speed
benchmark's parts, ``erg_jax.jobs.speed``) and checks the targets of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from erg_jax.energy import Energy, energy_attention
from erg_jax.jobs.speed.timing import compiled_bytes, interleaved_medians

__all__ = ["attention_table", "compiled_bytes", "interleaved_medians", "run", "targets"]
SECTIONS = ("attention", "guidance", "sampler", "peer", "floor", "bf16", "features", "nag", "wan")


def reference_einsum_attention(q, k, v):
    """Textbook attention, softmax(q k^T / sqrt(d)) v, written out with einsum."""
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    return jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(logits, axis=-1), v)


def _memory_budget() -> int:
    """Bytes a contender may use: half of this machine's physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def attention_table(
    lengths=(256, 1024, 4096, 16384), batch=1, heads=8, head_dim=64, repeats=7
) -> list[dict]:
    """energy_attention (steps 1, traced tau) against the einsum and jax.nn references.

    A contender whose compiled program would need more than half the machine's memory
    is not run; its time is None and its memory the figure that excluded it.
    """
    rows = []
    budget = _memory_budget()
    for n in lengths:
        ks = jax.random.split(jax.random.key(n), 3)
        q, k, v = (jax.random.normal(kk, (batch, n, heads, head_dim)) for kk in ks)
        tau = jnp.float32(0.5)
        contenders = {
            "energy_attention": lambda q, k, v, tau: energy_attention(q, k, v, Energy(tau=tau)),
            "einsum": lambda q, k, v, tau: reference_einsum_attention(q * tau, k, v),
            "dot_product_attention": lambda q, k, v, tau: jax.nn.dot_product_attention(
                q * tau, k, v
            ),
        }
        mem = {name: compiled_bytes(fn, q, k, v, tau) for name, fn in contenders.items()}
        jitted = {name: jax.jit(fn) for name, fn in contenders.items() if mem[name] <= budget}
        rounds = repeats if n <= 4096 else max(1, repeats // 3)
        secs = interleaved_medians(
            {name: (lambda f=f, a=(q, k, v, tau): f(*a)) for name, f in jitted.items()}, rounds
        )
        refs = [secs[r] for r in ("einsum", "dot_product_attention") if r in secs]
        rows.append(
            {
                "tokens": n,
                **{f"{name}_ms": 1e3 * secs[name] if name in secs else None for name in mem},
                **{f"{name}_mib": b / 2**20 for name, b in mem.items()},
                "ratio_to_faster_reference": secs["energy_attention"] / min(refs) if refs else None,
            }
        )
    return rows


def run(only=SECTIONS, *, small: bool = False, repeats: int = 5, lengths=None) -> dict:
    """Every requested section's figures (see docs/BENCHMARKS.md) and the targets met."""
    from erg_jax.jobs.speed import features, guidance, nag, peer, sampler, setups, wan

    unknown = set(only) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown benchmarks {sorted(unknown)}; known: {SECTIONS}")
    result = {
        "device": str(jax.devices()[0]),
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "small": small,
    }
    if "attention" in only:
        lengths = lengths or ((64, 256) if small else (256, 1024, 4096, 16384))
        result["attention"] = attention_table(lengths, repeats=repeats)
    batch = 2 if small else 8
    if "guidance" in only:
        result["guidance"] = [
            guidance.guidance_costs(setups.dit_setup(small, batch), repeats),
            guidance.guidance_costs(setups.mmdit_setup(small, batch), repeats),
        ]
    if "sampler" in only:
        dit2 = setups.dit_setup(small, 2)
        result["sampler"] = {
            "scan_vs_loop": sampler.scan_vs_loop(dit2, 3 if small else 8, repeats),
            "compile": sampler.compile_times(dit2, rounds=1 if small else 2),
            "sweep": sampler.sweep_compiles(dit2),
        }
    if "peer" in only:
        result["peer"] = peer.peer(small, batch, repeats)
    if "floor" in only:
        result["floor"] = guidance.floor(
            setups.dit_setup(small, batch), repeats, 256 if small else 2048
        )
    if "bf16" in only:
        result["bf16"] = guidance.bf16(small, batch, 2 if small else 6, repeats)
    if "features" in only:
        result["features"] = features.feature_rates(small, 2 if small else 32, repeats)
    if "nag" in only:
        result["nag"] = nag.nag_table(small, batch, repeats)
    if "wan" in only:
        result["wan"] = wan.wan_costs(wan.wan_setup(small, 2), repeats)
    result["targets"] = targets(result)
    return result


def targets(r: dict) -> dict:
    """Each performance target (docs/BENCHMARKS.md) the result measures: (value, bound, met)."""
    out = {}

    def check(name, value, bound):
        if value is not None:
            out[name] = {"value": value, "bound": bound, "met": bool(value <= bound)}

    if "guidance" in r:
        dit, mm = r["guidance"][0], r["guidance"][1]
        check("erg_over_cfg", dit["ratio_to_cfg"]["erg"], 1.03)
        check("erg_all_layers_over_cfg", dit["ratio_to_cfg"]["erg_all_layers"], 1.03)
        check("cfg_over_none", dit["ratio_to_none"]["cfg"], 2.05)
        check("erg_cache2_over_cfg", dit["ratio_to_cfg"]["erg_cache2"], 0.6)
        check("mmdit_erg_over_cfg", mm["ratio_to_cfg"]["erg"], 0.85)
    if "sampler" in r:
        s = r["sampler"]
        check("scan_over_loop", s["scan_vs_loop"]["scan_over_loop"], 1.0)
        check("compile_250_over_25", s["compile"]["ratio"], 1.2)
        check("compiles_per_sweep", s["sweep"]["compiles"], 1)
    if "attention" in r:
        ratios = [row["ratio_to_faster_reference"] for row in r["attention"]]
        ratios = [x for x in ratios if x is not None]
        check("attention_over_faster_reference", max(ratios) if ratios else None, 1.05)
    if "peer" in r:
        check("ours_erg_over_diffusers_cfg", r["peer"]["ours_erg_over_diffusers_cfg"], 0.75)
    if "floor" in r:
        share = r["floor"]["cfg"]["share_of_matmul_rate"]
        out["share_of_matmul_rate"] = {"value": share, "bound": 0.7, "met": share >= 0.7}
    return out
