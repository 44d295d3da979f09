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


def test_a_hybrid_mesh_puts_whole_slices_along_the_dcn_axes():
    config = {"data": -1, "fsdp": 2, "tensor": 1, "dcn_data": 2, "dcn_fsdp": 1}
    mesh = sharding.mesh_from_config(config)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)[..., 0]
    # one process without slices: devices 0-3 form slice 0, 4-7 slice 1; each slice
    # fills ICI data rows 0-1 or 2-3 with its own devices
    assert set(ids[:2].ravel()) == {0, 1, 2, 3} and set(ids[2:].ravel()) == {4, 5, 6, 7}
    two_way = sharding.mesh_from_config({"data": 1, "fsdp": 2, "tensor": 2, "dcn_fsdp": 2})
    assert dict(two_way.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    fsdp_ids = np.vectorize(lambda d: d.id)(two_way.devices)[0, :, 0]
    assert set(fsdp_ids[:2]) <= {0, 1, 2, 3} and set(fsdp_ids[2:]) <= {4, 5, 6, 7}
    # no dcn sizes: the plain mesh
    plain = sharding.mesh_from_config({"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 1})
    assert dict(plain.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="do not split into 3 slices"):
        sharding.mesh_from_config({"data": -1, "dcn_data": 3})
    with pytest.raises(ValueError, match="in each of the 2 slices"):
        sharding.mesh_from_config({"data": 3, "dcn_data": 2})
    with pytest.raises(ValueError, match="mesh.dcn_pipe"):
        sharding.mesh_from_config({"data": -1, "dcn_pipe": 2})
    with pytest.raises(ValueError, match="mesh.dcn_data must be >= 1"):
        sharding.mesh_from_config({"data": -1, "dcn_data": 0})


def test_axis_rules_from_the_config_and_in_a_block():
    rules = dict(sharding.parse_rules("embed=,mlp=fsdp,batch=data+fsdp+tensor"))
    assert rules["embed"] is None and rules["mlp"] == "fsdp"
    assert rules["batch"] == ("data", "fsdp", "tensor") and rules["heads"] == "tensor"
    assert dict(sharding.parse_rules("")) == dict(sharding.DEFAULT_RULES)
    with pytest.raises(ValueError, match="logical_axis_rules.*embd"):
        sharding.parse_rules("embd=fsdp")
    with pytest.raises(ValueError, match="pipe"):
        sharding.parse_rules("embed=pipe")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.logical_spec(("embed", "mlp"), (8, 8), mesh) == P("fsdp", "tensor")
    with sharding.use_rules(tuple(rules.items())):
        assert sharding.logical_spec(("embed", "mlp"), (8, 8), mesh) == P(None, "fsdp")
        assert sharding.batch_sharding(mesh, (8, 3)).spec == P(("data", "fsdp", "tensor"), None)
    assert sharding.logical_spec(("embed", "mlp"), (8, 8), mesh) == P("fsdp", "tensor")


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
