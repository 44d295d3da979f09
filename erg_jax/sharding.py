"""Device meshes and logical-axis sharding of parameters (DESIGN.md, "Sharding").

Modules name each parameter dimension with a logical axis ('embed', 'heads', 'mlp',
'vocab', ...). A config maps mesh axes to sizes ({'data': -1, 'fsdp': 1, 'tensor': 1})
and logical axes to mesh axes (``DEFAULT_RULES``); from these we build NamedShardings
and place host (numpy or memory-mapped) parameters directly onto their devices, each
device reading only its own slice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, Any]]

DEFAULT_AXES = {"data": -1, "fsdp": 1, "tensor": 1}

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("positions", None),
    ("buckets", None),
    ("layers", None),
)


def make_mesh(axes: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A Mesh with the named axes; one size may be -1 (the devices left over).

    Uses ``jax.sharding.Mesh`` (automatic axis types), so jit propagates shardings as in
    GSPMD; ``jax.make_mesh`` would default to explicit axes.

    Args:
      axes: ordered {name: size}; defaults to ``DEFAULT_AXES`` (all devices on 'data').
      devices: devices to use; defaults to ``jax.devices()``.

    Raises:
      ValueError: sizes that do not multiply to the number of devices.
    """
    axes = dict(DEFAULT_AXES if axes is None else axes)
    devices = list(jax.devices() if devices is None else devices)
    free = [k for k, v in axes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {axes}")
    if any(v < 1 for k, v in axes.items() if k not in free):
        raise ValueError(f"mesh axis sizes must be >= 1 or -1, got {axes}")
    fixed = math.prod(v for k, v in axes.items() if k not in free)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"mesh {axes} does not divide {len(devices)} devices")
        axes[free[0]] = len(devices) // fixed
    if math.prod(axes.values()) != len(devices):
        raise ValueError(
            f"mesh {axes} needs {math.prod(axes.values())} devices, have {len(devices)}"
        )
    grid = np.asarray(devices, dtype=object).reshape(tuple(axes.values()))
    return Mesh(grid, tuple(axes))


def _mesh_axes(mesh: Mesh, entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    return tuple(n for n in names if n in mesh.shape)


def logical_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules | None = None
) -> PartitionSpec:
    """The PartitionSpec of one array from its logical axis names.

    A mesh axis serves at most one dimension (the first that asks for it), and a
    dimension its mesh axes do not divide stays replicated rather than failing, so small
    tensors (norm scales, a bias table with few heads) are simply copied.
    """
    table = dict(DEFAULT_RULES if rules is None else rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        axes = tuple(a for a in _mesh_axes(mesh, table.get(name)) if a not in used)
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def param_shardings(abstract: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """NamedShardings for a tree of parameters annotated with logical axis names.

    Args:
      abstract: the output of ``jax.eval_shape(module.init, ...)``: leaves are
        ``nn.LogicallyPartitioned`` boxes (from ``nn.with_logical_partitioning``) or
        plain ShapeDtypeStructs, which are replicated.
      mesh: the device mesh.
      rules: (logical, mesh axes) pairs; defaults to ``DEFAULT_RULES``.

    Returns:
      The unboxed tree with a NamedSharding at each leaf.
    """

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            spec = logical_spec(leaf.names, leaf.value.shape, mesh, rules)
        else:
            spec = PartitionSpec()
        return NamedSharding(mesh, spec)

    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    return jax.tree_util.tree_map(one, abstract, is_leaf=is_box)


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules: Rules | None = None) -> NamedSharding:
    """Sharding of an input whose leading axis is the batch (rest replicated)."""
    names = ("batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, logical_spec(names, shape, mesh, rules))


def place(tree: Any, shardings: Any, dtype: Any = None) -> Any:
    """Places host arrays onto their shardings, each device receiving only its slice.

    Args:
      tree: numpy (or memory-mapped) arrays.
      shardings: a matching tree of NamedShardings.
      dtype: cast each slice to this dtype on the host first (None keeps it).
    """

    def one(x, sharding):
        x = np.asarray(x) if not isinstance(x, np.ndarray) else x
        target = x.dtype if dtype is None else np.dtype(dtype)
        return jax.make_array_from_callback(
            x.shape, sharding, lambda idx: np.ascontiguousarray(x[idx], dtype=target)
        )

    return jax.tree_util.tree_map(one, tree, shardings)


def shardings_from_axes(axes: Any, abstract: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """NamedShardings from a tree of logical-name PartitionSpecs (``nn.get_partition_spec``)
    and the matching abstract params; a missing or short spec leaves dimensions replicated.
    """

    def one(spec, leaf):
        names = tuple(spec) if spec is not None else ()
        names = names + (None,) * (len(leaf.shape) - len(names))
        return NamedSharding(mesh, logical_spec(names, leaf.shape, mesh, rules))

    return jax.tree_util.tree_map(
        one, axes, abstract, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
