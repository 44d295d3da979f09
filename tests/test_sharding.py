"""Mesh construction, logical-axis shardings and direct placement (erg_jax.sharding)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from erg_jax import sharding


def test_make_mesh_fills_the_free_axis_and_rejects_bad_sizes():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    all_auto = all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert all_auto
    with pytest.raises(ValueError, match="does not divide"):
        sharding.make_mesh({"data": -1, "tensor": 3})
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.make_mesh({"data": 2, "tensor": 2})
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh({"data": -1, "tensor": -1})


def test_logical_spec_rules_divisibility_and_reuse():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.logical_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
    # a dimension its mesh axes do not divide is replicated, not an error
    assert sharding.logical_spec(("embed", "heads"), (64, 3), mesh) == P("fsdp", None)
    # a mesh axis serves one dimension only
    assert sharding.logical_spec(("heads", "mlp"), (8, 8), mesh) == P("tensor", None)
    assert sharding.logical_spec(("batch", None), (4, 5), mesh) == P(("data", "fsdp"), None)
    assert sharding.logical_spec(("batch",), (6,), mesh) == P(None)
    custom = (("embed", "tensor"),)
    assert sharding.logical_spec(("embed", "mlp"), (4, 4), mesh, custom) == P("tensor", None)


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.with_logical_partitioning(nn.initializers.normal(), ("embed", "mlp"))
        h = nn.Dense(16, kernel_init=init, name="up")(x)
        return nn.Dense(4, name="down")(h)  # unannotated: replicated


def test_param_shardings_and_place_put_each_slice_on_its_device():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract = jax.eval_shape(_Tiny().init, jax.random.key(0), jnp.zeros((1, 8)))["params"]
    shard = sharding.param_shardings(abstract, mesh)
    assert shard["up"]["kernel"].spec == P("fsdp", "tensor")
    assert shard["down"]["kernel"].spec == P()
    rng = np.random.default_rng(0)
    host = jax.tree_util.tree_map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32), nn.unbox(abstract)
    )
    placed = sharding.place(host, shard, dtype=jnp.bfloat16)
    up = placed["up"]["kernel"]
    assert up.dtype == jnp.bfloat16 and up.sharding == shard["up"]["kernel"]
    for s in up.addressable_shards:
        assert s.data.shape == (4, 8)
        want = host["up"]["kernel"][s.index].astype(jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(s.data), want)
    x = jnp.ones((4, 8))
    rounded = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16).astype(np.float32), host)
    np.testing.assert_allclose(
        _Tiny().apply({"params": placed}, x), _Tiny().apply({"params": rounded}, x), rtol=1e-5
    )
