"""Device meshes and logical-axis sharding of parameters (docs/INTERFACES.md).

Modules name each parameter dimension with a logical axis ('embed', 'heads', 'mlp',
'vocab', ...). A config maps mesh axes to sizes ({'data': -1, 'fsdp': 1, 'tensor': 1})
and logical axes to mesh axes (``DEFAULT_RULES``); from these we build NamedShardings
and place host (numpy or memory-mapped) parameters directly onto their devices, each
device reading only its own slice.

Multi-slice TPU jobs give each mesh axis a size within a slice (ICI) and a number of
slices (DCN, ``dcn_<axis>``); ``mesh_from_config`` builds the hybrid mesh with
``jax.experimental.mesh_utils.create_hybrid_device_mesh``, so that only the axes given
DCN sizes communicate across slices. Keep DCN on 'data' (or 'fsdp'): 'tensor' moves
activations every layer, 'context' every attention.

Context parallelism: a mesh axis "context" splits the token sequence of a long input (a
video's space-time tokens) over its devices. The logical axis "length" of activations
maps to it (``constrain``), and the denoiser's self-attention runs as ring or Ulysses
attention over it (``erg_jax.context_parallel``; ``sequence_attention`` picks which,
``check_attention`` refuses settings that cannot run). The batch still splits over
'data' and 'fsdp' only (``data_parallel_size``).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, Any]]

DEFAULT_AXES = {"data": -1, "fsdp": 1, "tensor": 1}
# The mesh axes a config may name, outermost first: the innermost axes get the nearest
# devices, so the more an axis communicates the later it comes (data: never in a
# sampling step; fsdp: parameter gathers; context: every attention; tensor: every matmul).
MESH_AXES = ("data", "fsdp", "context", "tensor")
CONTEXT = "context"
# Attention implementations that split the sequence over CONTEXT (erg_jax.context_parallel).
CONTEXT_IMPLEMENTATIONS = ("ring", "ulysses")
DCN_PREFIX = "dcn_"

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", CONTEXT),  # token activations (b, n, ...): the sequence over the context axis
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("positions", None),
    ("buckets", None),
    ("layers", None),
)


_ACTIVE = threading.local()


def current_rules() -> Rules:
    """The rules set by the innermost ``use_rules``, else ``DEFAULT_RULES``."""
    return getattr(_ACTIVE, "rules", None) or DEFAULT_RULES


@contextlib.contextmanager
def use_rules(rules: Rules | None) -> Iterator[None]:
    """Within the block, functions given ``rules=None`` use these rules (None: defaults)."""
    old = getattr(_ACTIVE, "rules", None)
    _ACTIVE.rules = tuple(rules) if rules else None
    try:
        yield
    finally:
        _ACTIVE.rules = old


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules | None = None) -> Iterator[None]:
    """The mesh (``jax.set_mesh``) and axis rules (``use_rules``) of a block: kernels
    outside GSPMD (splash attention) read them while a program is traced and shard
    themselves over the same axes as their inputs."""
    with use_rules(rules), jax.set_mesh(mesh):
        yield


def parse_rules(spec: str, field: str = "logical_axis_rules") -> tuple[tuple[str, Any], ...]:
    """``DEFAULT_RULES`` with the overrides of "logical=mesh+mesh,...".

    "embed=" replicates the embedding dimension, "batch=data+fsdp" splits the batch over
    both axes, "mlp=fsdp" moves the MLP width to fsdp, "length=" keeps token activations
    whole on every device. A logical name that no model uses is refused, as is a mesh axis
    other than those of ``MESH_AXES``.
    """
    table = dict(DEFAULT_RULES)
    for item in [x.strip() for x in str(spec).split(",") if x.strip()]:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in table:
            raise ValueError(
                f"{field} must be 'logical=mesh[+mesh],...' with logical one of "
                f"{sorted(table)}, got {item!r}"
            )
        axes = tuple(a.strip() for a in value.split("+") if a.strip())
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(
                f"{field}: {name}={value!r} names mesh axes {bad}; allowed: {list(MESH_AXES)}"
            )
        table[name] = None if not axes else axes[0] if len(axes) == 1 else axes
    return tuple(table.items())


def mesh_from_config(mesh_config: Mapping[str, int], devices: Sequence | None = None) -> Mesh:
    """The job's mesh from its config section: ICI sizes per axis plus ``dcn_<axis>``,
    the axes in ``MESH_AXES``' order (others after them, in the config's).

    Without DCN sizes (all 1) this is ``make_mesh``. With them, the devices fall into
    slices (TPU ``slice_index``; with none, processes; in one process without slices,
    consecutive runs of devices, which lays out the same mesh for testing) and
    ``create_hybrid_device_mesh`` places each slice's devices along the ICI axes and the
    slices along the DCN axes: mesh axis a has size ici_a * dcn_a.

    Raises:
      ValueError: a DCN size < 1 or on an unknown axis, or device counts that do not
        factor into the slices and the ICI sizes.
    """
    items = dict(mesh_config)
    dcn = {k[len(DCN_PREFIX) :]: int(v) for k, v in items.items() if k.startswith(DCN_PREFIX)}
    ici = {k: int(v) for k, v in items.items() if not k.startswith(DCN_PREFIX)}
    # MESH_AXES' order whatever the config's (a ConfigDict iterates its keys sorted)
    rank = {a: i for i, a in enumerate(MESH_AXES)}
    ici = dict(sorted(ici.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    for name, size in dcn.items():
        if name not in ici:
            raise ValueError(f"mesh.{DCN_PREFIX}{name}: no mesh axis {name!r} (have {list(ici)})")
        if size < 1:
            raise ValueError(f"mesh.{DCN_PREFIX}{name} must be >= 1, got {size}")
    slices = math.prod(dcn.values()) if dcn else 1
    devices = list(jax.devices() if devices is None else devices)
    if slices == 1:
        return make_mesh(ici, devices)
    if len(devices) % slices:
        raise ValueError(
            f"mesh: {len(devices)} devices do not split into {slices} slices "
            f"(the product of the dcn_* sizes {dcn})"
        )
    per_slice = len(devices) // slices
    try:  # resolve -1 and check the ICI sizes against one slice's devices
        ici = dict(make_mesh(ici, devices[:per_slice]).shape)
    except ValueError as e:
        raise ValueError(f"{e} in each of the {slices} slices (dcn sizes {dcn})") from e
    from jax.experimental import mesh_utils

    names = list(ici)
    ici_shape = [ici[a] for a in names]
    dcn_shape = [dcn.get(a, 1) for a in names]
    if hasattr(devices[0], "slice_index"):
        grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
    elif len({d.process_index for d in devices}) == slices:
        grid = mesh_utils.create_hybrid_device_mesh(
            ici_shape, dcn_shape, devices, process_is_granule=True
        )
    elif jax.process_count() == 1:
        views = [_SliceView(d, i // per_slice) for i, d in enumerate(devices)]
        grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, views)
        grid = np.vectorize(lambda v: v.device, otypes=[object])(grid)
    else:
        raise ValueError(
            f"mesh: {slices} DCN slices asked for, but the devices carry no slice_index and "
            f"the job has {jax.process_count()} processes"
        )
    return Mesh(grid, tuple(names))


class _SliceView:
    """A device seen as belonging to a given slice (one process without slices)."""

    def __init__(self, device, slice_index: int):
        self.device, self.slice_index = device, slice_index

    def __getattr__(self, name):
        return getattr(self.device, name)


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
    table = dict(current_rules() if rules is None else rules)
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
      rules: (logical, mesh axes) pairs; defaults to ``current_rules()``.

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


def data_parallel_size(mesh: Mesh) -> int:
    """Devices a batch is split over: the product of the mesh's data and fsdp axes."""
    return math.prod(mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape)


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


def context_size(mesh: Any) -> int:
    """Devices the sequence is split over: the mesh's "context" axis (1 without one, or
    inside a shard_map that already made it manual). ``mesh``: a Mesh or AbstractMesh."""
    if mesh is None or mesh.empty or CONTEXT not in mesh.shape:
        return 1
    return 1 if CONTEXT in getattr(mesh, "manual_axes", ()) else int(mesh.shape[CONTEXT])


def check_attention(implementation: str, mesh: Mesh) -> None:
    """Settings errors of the denoiser's attention on a mesh, naming both fields: a
    context axis of more than one device needs ``model.attention_implementation`` "" (the
    choice of ``sequence_attention``), "ring" or "ulysses"; one device has no sequence to
    split, so "ring" and "ulysses" there are refused."""
    size, impl = context_size(mesh), str(implementation or "")
    if size > 1 and impl and impl not in CONTEXT_IMPLEMENTATIONS:
        raise ValueError(
            f"model.attention_implementation={impl!r} keeps the whole sequence on every "
            f"device, but mesh.{CONTEXT}={size} splits it: use '' (picks ulysses or ring), "
            f"'ring' or 'ulysses', or set mesh.{CONTEXT}=1"
        )
    if size == 1 and impl in CONTEXT_IMPLEMENTATIONS:
        raise ValueError(
            f"model.attention_implementation={impl!r} splits the sequence over the mesh "
            f"axis {CONTEXT!r}, but mesh.{CONTEXT}=1: set mesh.{CONTEXT} > 1, or another "
            "implementation"
        )


def sequence_attention(implementation: str | None, heads: int) -> str | None:
    """The implementation of a denoiser's self-attention of ``heads`` heads, read while
    it is traced under ``jax.set_mesh``.

    On a mesh whose "context" axis has P > 1 devices, None or "" is "ulysses" where the
    heads each device keeps after the "tensor" split (all of them where "tensor" does not
    divide them, as ``erg_jax.context_parallel`` splits them) divide by P, else "ring";
    a given implementation is kept. Elsewhere (one device, or a model initialised outside
    the job's mesh) "ring" and "ulysses" have no sequence to split and give None, as None
    and "" do: ``energy_attention``'s own pick for the backend. Ulysses costs two
    all-to-alls per attention and runs any local kernel on the whole sequence; ring
    holds one (n/P, m/P) block of logits at a time and takes any number of heads.
    """
    mesh = jax.sharding.get_abstract_mesh()
    size = context_size(mesh)
    if size == 1:
        return None if implementation in CONTEXT_IMPLEMENTATIONS else implementation or None
    if implementation:
        return implementation
    tensor = 1 if "tensor" in mesh.manual_axes else int(mesh.shape.get("tensor", 1))
    per_device = heads // tensor if heads % tensor == 0 else heads
    return "ulysses" if per_device % size == 0 else "ring"


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules | None = None) -> jax.Array:
    """x kept laid out as its logical axis names say, on the mesh of ``jax.set_mesh`` and
    the rules of ``use_rules`` (``logical_spec``: a dimension its mesh axes do not divide
    stays whole), e.g. ("batch", "length", None) for token activations (b, n, D).

    A no-op without a mesh, and where no dimension would be split: replicating an
    activation is never asked for here, only splits, so GSPMD keeps its own choice there.
    Axes a surrounding shard_map made manual are left out.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    table = [
        (name, tuple(a for a in _mesh_axes(mesh, entry) if a not in mesh.manual_axes))
        for name, entry in dict(current_rules() if rules is None else rules).items()
    ]
    spec = logical_spec(names, x.shape, mesh, tuple((n, a or None) for n, a in table))
    if all(entry is None for entry in spec):
        return x
    return jax.lax.with_sharding_constraint(x, spec)
