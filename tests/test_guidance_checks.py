"""Guidance settings a review found mishandled: per-head energies, layer ids past the
model's depth, the kickoff counted in steps, unconditional C-ERG's tempered encoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toys import make_toy_transformer

from erg_jax import Energy
from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax.conditioning import TextConditions
from erg_jax.control import AttentionControl

B, SIZE, C, W, L, HEADS = 2, 4, 2, 16, 3, 2


def _setup(seed=0):
    den, _ = make_toy_transformer(L, SIZE, C, W, heads=HEADS, seed=seed)
    keys = S.sample_keys(seed, jnp.arange(B))
    noise = S.initial_noise(keys, (SIZE, SIZE, C))
    cond = jax.random.normal(jax.random.key(seed + 1), (B, W))
    return den, keys, noise, {"cond": cond, "null": jnp.zeros_like(cond)}


def _weak_x0(guider, t=0.6):
    den, keys, noise, conds = _setup()
    smp = S.make_sampler("euler", 4)
    point = S._flow_point(smp, jnp.float32(t))
    x0s, _ = S.evaluate((den,), noise, point, guider, conds, smp, keys, 0, L)
    return x0s[1], (den, noise, point, conds)


def test_per_head_energy_reaches_each_head_of_the_chosen_layers():
    tau = jnp.asarray([0.3, 2.0])  # (heads,)
    weak, (den, x, point, conds) = _weak_x0(G.erg(3.0, energy=Energy(tau), layers=[1]))
    # The same control written out by hand: (layers, heads) fields, layer 1 tempered.
    taus = jnp.ones((L, HEADS)).at[1].set(tau)
    ctl = AttentionControl(energy=Energy(taus, jnp.ones((L, HEADS)), jnp.ones((L, HEADS))))
    raw = den(x, jnp.full((B,), point.native), conds["cond"], ctl)
    ref = x - point.s * raw  # velocity -> x0 at a = 1 - t, s = t
    np.testing.assert_allclose(np.asarray(weak), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "energy",
    [
        Energy(jnp.asarray([0.4, 0.4])),  # per head
        Energy(jnp.full((L, HEADS), 0.4)),  # per layer and head
        Energy(jnp.full((L,), 0.4)),  # per layer
    ],
)
def test_uniform_per_head_or_per_layer_energy_equals_the_scalar(energy):
    ours, _ = _weak_x0(G.erg(3.0, energy=energy, layers=[0, 2]))
    ref, _ = _weak_x0(G.erg(3.0, energy=Energy(0.4), layers=[0, 2]))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_an_energy_of_the_wrong_shape_is_named():
    with pytest.raises(ValueError, match=r"energy tau must be .*got shape \(2, 5\)"):
        _weak_x0(G.erg(3.0, energy=Energy(jnp.ones((2, 5)))))


@pytest.mark.parametrize(
    "guider",
    [
        lambda: G.erg(3.0, layers=[1, 3]),
        lambda: G.pag(3.0, layers=[5]),
        lambda: G.seg(3.0, layers=[3]),
        lambda: G.slg(3.0, layers=[0, 4]),
    ],
)
def test_layers_past_the_depth_are_refused_with_the_depth(guider):
    den, keys, noise, conds = _setup()
    with pytest.raises(ValueError, match="it has 3 attention layers"):
        S.sample(den, noise, conds, guider(), S.make_sampler("euler", 2), keys=keys, num_layers=L)


def test_kickoff_in_steps_counts_steps_not_noise_levels():
    den, keys, noise, conds = _setup()

    def run(unit, shift):
        g = G.erg(3.0, energy=Energy(0.2), kappa=0.3, kappa_unit=unit)
        smp = S.make_sampler("euler", 10, shift=shift)
        return np.asarray(S.sample(den, noise, conds, g, smp, keys=keys, num_layers=L))

    # On the even grid t_i = 1 - i / 10 both switch I-ERG on from step 3.
    np.testing.assert_allclose(run("steps", 1.0), run("noise", 1.0), rtol=1e-6, atol=1e-6)
    # Shift 3 keeps t > 0.7 until step 6: the noise unit switches on later.
    assert np.max(np.abs(run("steps", 3.0) - run("noise", 3.0))) > 1e-3
    on = [
        float(G.erg(3.0, energy=Energy(0.2), kappa=0.3, kappa_unit="steps")
              .controls(0.5, L, progress=i / 10)[1].energy.tau[0]) < 1.0
        for i in range(10)
    ]  # fmt: skip
    assert on == [False] * 3 + [True] * 7
    with pytest.raises(ValueError, match="kappa_unit"):
        G.erg(3.0, kappa_unit="percent")


class _FakeEncoder:
    """Token ids from characters; the 'encoding' scales with tau, so tempering shows."""

    def tokenize(self, texts):
        ids = np.zeros((len(texts), 4), np.int32)
        for i, t in enumerate(texts):
            ids[i, : min(len(t), 4)] = [ord(ch) % 50 + 1 for ch in t[:4]]
        return ids, np.ones_like(ids)

    def encode_branches(self, ids, mask, energies):
        base = jnp.asarray(ids, jnp.float32)[..., None] + jnp.arange(3.0)
        return {"hidden_state": jnp.stack([base * float(e.tau) for e in energies])}


def test_unconditional_c_erg_uses_the_tempered_empty_prompt():
    slots = TextConditions([_FakeEncoder()], [], tau_c=0.5).slots(np.arange(2))
    cond, tempered = slots["cond"]["context"], slots["tempered"]["context"]
    np.testing.assert_allclose(np.asarray(tempered), 0.5 * np.asarray(cond))
    assert np.max(np.abs(np.asarray(cond))) > 0
    same = TextConditions([_FakeEncoder()], [], tau_c=1.0).slots(np.arange(2))
    np.testing.assert_array_equal(same["tempered"]["context"], same["cond"]["context"])


def test_sd3_configs_slg_recipe_covers_steps_one_to_five():
    """Stability's SD3.5 SLG recipe: layers 7-9 over 1-20% of 28 steps (diffusers runs it
    at steps i with 0.28 < i < 5.6), here as a noise-level window on the shift-3 grid."""
    from configs import sd3
    from erg_jax import guidance as G
    from erg_jax import predictions as P
    from erg_jax.jobs.job_setup import make_methods
    from erg_jax.models import registry
    from erg_jax.models.mmdit_config import mmdit_config

    config = sd3.get_config("medium")
    config.guidance.methods = "cfg+slg"
    guider = make_methods(config, text=True)["cfg+slg"]
    assert guider.terms[1].skip_layers.spec == "joint_blocks.7-9"  # by name, until the model
    guider = G.resolve_targets(
        guider, registry.get("mmdit").make_layout(mmdit_config("sd3.5-medium"))
    )
    cfg, slg = guider.terms
    grid = np.asarray(P.flow_grid(config.sampler.steps, config.sampler.shift))[:-1]
    on = [i for i, t in enumerate(grid) if float(slg.weight(t)) != 1.0]
    assert on == [1, 2, 3, 4, 5]
    assert all(float(cfg.weight(t)) != 1.0 for t in grid)
    assert list(np.asarray(slg.skip_layers)) == [7, 8, 9]
    config.guidance.slg.interval = (0.9, 0.5)
    with pytest.raises(ValueError, match="interval"):
        make_methods(config, text=True)
