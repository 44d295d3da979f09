"""Tiny DiT and MMDiT through the samplers with every main guider, on 1 and 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from erg_jax import Energy, checkpoint
from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax.models import dit, load_denoiser, mmdit

GUIDERS = {
    "cfg": G.cfg(3.0),
    "erg": G.erg(3.0, energy=Energy(0.3), layers=[1], kappa=0.1),
    "erg+apg": G.with_apg(G.erg(3.0, energy=Energy(0.3)), momentum=-0.5, eta=0.0),
    "pag": G.pag(3.0, layers=[0]),
    "seg": G.seg(3.0, sigma=2.0, layers=[1]),
}


def _models():
    dcfg = dit.dit_config(
        "tiny/2", prediction="velocity", learned_sigma=False, out_channels=4, time="sd3"
    )
    den_d = dit.make_denoiser(dcfg, dit.init_params(dcfg, jax.random.key(0)))
    mcfg = mmdit.mmdit_config("tiny")
    den_m = mmdit.make_denoiser(mcfg, mmdit.init_params(mcfg, jax.random.key(1)))
    b = 8
    labels = jnp.arange(b) % 10
    ctx = jax.random.normal(jax.random.key(2), (b, 5, mcfg["joint_attention_dim"]))
    pooled = jax.random.normal(jax.random.key(3), (b, mcfg["pooled_projection_dim"]))
    text = {"context": ctx, "pooled": pooled}
    null = jax.tree_util.tree_map(jnp.zeros_like, text)
    return {
        "dit": (den_d, dcfg, {"cond": labels, "null": jnp.full((b,), 10)}),
        "mmdit": (den_m, mcfg, {"cond": text, "null": null}),
    }


@pytest.mark.parametrize("model", ["dit", "mmdit"])
def test_guided_sampling_on_1_and_8_devices(model):
    den, cfg, conds = _models()[model]
    b = 8
    keys = S.sample_keys(0, jnp.arange(b))
    shape = (cfg["sample_size"], cfg["sample_size"], cfg["in_channels"])
    noise = S.initial_noise(keys, shape)
    smp = S.make_sampler("euler", 3, time="sd3")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    run = jax.jit(
        lambda n, c, k, g: S.sample(den, n, c, g, smp, keys=k, num_layers=cfg["num_layers"])
    )
    outs = {}
    for name, guider in GUIDERS.items():
        single = run(noise, conds, keys, guider)
        put = lambda x: jax.device_put(x, rows)  # noqa: E731
        sharded = run(put(noise), jax.tree_util.tree_map(put, conds), put(keys), guider)
        assert len(sharded.sharding.device_set) == 8
        np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=2e-4)
        assert bool(jnp.all(jnp.isfinite(single)))
        outs[name] = single
    for a in outs:
        for b_ in outs:
            if a < b_:
                assert float(jnp.max(jnp.abs(outs[a] - outs[b_]))) > 1e-4, (a, b_)


def test_checkpoint_restore_into_fsdp_shardings_matches(tmp_path):
    den, cfg, conds = _models()["dit"]
    checkpoint.save(str(tmp_path), den.params, cfg)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    from erg_jax import sharding

    shard = sharding.shardings_from_axes(dit.param_axes(cfg), dit.abstract_params(cfg), mesh)
    loaded = load_denoiser(str(tmp_path), shardings=shard)
    leaves = jax.tree_util.tree_leaves(loaded.params)
    assert any(not leaf.sharding.is_fully_replicated for leaf in leaves)
    x = S.initial_noise(S.sample_keys(0, jnp.arange(8)), (8, 8, 4))
    t = jnp.full((8,), 500.0)
    np.testing.assert_allclose(loaded(x, t, conds["cond"]), den(x, t, conds["cond"]), atol=1e-5)
