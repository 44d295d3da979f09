"""XLA's FLOP count of a whole program, every loop trip counted (the dry run's time).

XLA's cost analysis of a lowered, not yet partitioned program gives the FLOPs of all
devices together (a compiled SPMD program counts one device's), but counts a while
loop's body once, whatever its trip count: a scan of 28 sampling steps counts as one
step. ``loop_correction`` walks the jaxpr and adds, for each scan, (n - 1) times its body
lowered alone, recursively for the scans inside (branches under ``lax.map`` on CPU,
scanned blocks); a cond counts as its costliest branch, as XLA counts it (an upper bound
where a method skips work at run time).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.extend import core as jcore
from jax.sharding import NamedSharding, PartitionSpec

from erg_jax import sharding


def abstract_guider(guider, mesh):
    """The guider's leaves as replicated ShapeDtypeStructs: data of the program, as the
    job's guider is (its scalars vary between calls without a recompile)."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def abstract(v):
        return jax.ShapeDtypeStruct(np.shape(v), np.result_type(v), sharding=replicated)

    return jax.tree_util.tree_map(abstract, guider)


def _xla_flops(lowered) -> float:
    """XLA's cost analysis of a lowered, not yet partitioned program: global FLOPs, each
    loop body counted once."""
    return float((lowered.cost_analysis() or {}).get("flops", 0.0))


def _once(closed, cache: dict) -> float:
    """XLA's count of a loop body or cond branch lowered alone (its own loops once)."""
    if id(closed) not in cache:  # the jaxpr is kept: its id stays its own
        avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in closed.in_avals]
        cache[id(closed)] = closed, _xla_flops(jax.jit(jcore.jaxpr_as_fun(closed)).lower(*avals))
    return cache[id(closed)][1]


def loop_correction(jaxpr, cache: dict) -> float:
    """FLOPs XLA's count of ``jaxpr`` leaves out: a scan of length n whose lowering holds
    c copies of its body (c = 1, its unroll, or n) runs it n times; a cond counts as its
    costliest branch, as XLA counts it, loops inside included. A while loop of unknown
    trip count stays counted once."""
    extra = 0.0
    for eqn in jaxpr.eqns:
        p = eqn.params
        if eqn.primitive.name == "scan":
            n, unroll, body = int(p["length"]), int(p["unroll"]), p["jaxpr"]
            copies = n if unroll >= n else unroll + n % unroll  # lax.scan's remainder
            inner = loop_correction(body.jaxpr, cache)
            if inner or copies != n:
                extra += (n - copies) * _once(body, cache) + n * inner
        elif eqn.primitive.name == "cond":
            inner = [loop_correction(b.jaxpr, cache) for b in p["branches"]]
            if any(inner):
                once = [_once(b, cache) for b in p["branches"]]
                extra += max(o + i for o, i in zip(once, inner, strict=True)) - max(once)
        else:  # pjit, remat, custom_jvp/vjp: their loops
            extra += sum(loop_correction(j, cache) for j in jcore.jaxprs_in_params(p))
    return extra


def program_flops(program, args: tuple, guider, mesh, rules) -> float:
    """FLOPs of ``program(*args, guider)``, all devices together: XLA's count of the
    lowered program plus ``loop_correction``. Lowered, not compiled: seconds, not minutes."""
    with jax.set_mesh(mesh), sharding.use_rules(rules):
        traced = jax.jit(program, keep_unused=True).trace(*args, abstract_guider(guider, mesh))
        return _xla_flops(traced.lower()) + loop_correction(traced.jaxpr.jaxpr, {})
