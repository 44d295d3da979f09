"""One path from a method to a guider: every entry point builds the same guider from the
same settings, and the settings' edge cases (sweeps, masks, C-ERG temperatures, a no-op
ERG) mean one thing everywhere."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import dit as dit_configs
from configs import entropy as entropy_configs
from configs import quality as quality_configs
from configs import quickstart as quickstart_configs
from erg_jax import guidance as G
from erg_jax.conditioning import TextConditions

# Every base method and modifier, with settings away from every default, so an entry
# point that drops or renames one setting builds another guider.
SETTINGS = dict(
    scale=2.5,
    shape="linear",
    interval=(0.1, 0.9),
    cfg=dict(rescale=0.3),
    apg=dict(momentum=-0.4, norm_threshold=7.0, eta=0.2),
    erg=dict(tau=0.3, alpha=0.9, gamma=0.8, layers="1,2", kappa=0.15, steps=2, tau_c=0.6),
    pag=dict(layers="2"),
    seg=dict(sigma=2.0, layers="1"),
    slg=dict(layers="3"),
    sag=dict(layer="1", sigma=1.5),
    cads=dict(tau1=0.5, tau2=0.8, noise_scale=0.2, psi=0.7),
    zero_star=dict(zero_steps=2),
    mambo=dict(alpha=3.0),
    fdg=dict(scales=(6.0, 3.0), parallel=0.5),
    apg_mix=dict(apg_scale=7.0, cfg_steps=3, momentum=-0.3, norm_threshold=9.0),
    cache=dict(every=3, window=(0.2, 0.8)),
)
METHODS = (
    "none", "cfg", "apg", "erg", "pag", "seg", "slg", "sag", "autoguidance",
    "cfg_zero_star", "tcfg", "mambo", "fdg", "apg_mix",
    "erg+apg", "erg+cads", "cfg+pag", "erg+pag+zero_star", "erg+tcfg", "erg+mambo",
    "erg+fdg", "erg+apg_mix", "erg+cache", "cfg+seg+cads+cache",
)  # fmt: skip


def _section(config_section, settings: dict) -> None:
    """Writes the settings into a config's guidance section as a user's flags would."""
    for key, value in settings.items():
        if isinstance(value, dict):
            for k, v in value.items():
                config_section[key][k] = v
        else:
            config_section[key] = value


def _same(a, b, label):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb, f"{label}: another structure\n{ta}\n{tb}"
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=label)


def _entry_points(methods: str) -> dict:
    """Entry point -> {method name: guider}, each from SETTINGS."""
    from erg_jax.jobs import entropy, quality, quickstart
    from erg_jax.jobs.job_setup import make_methods
    from erg_jax.pipeline import Pipeline

    out = {}
    job = dit_configs.get_config("tiny")
    job.guidance.methods = methods
    _section(job.guidance, SETTINGS)
    out["launch.sample"] = make_methods(job, text=True)

    pipe = Pipeline.__new__(Pipeline)  # the call's settings need only the loaded settings
    pipe.settings = dit_configs.get_config("tiny")
    settings = pipe.guidance(**SETTINGS)
    out["Pipeline"] = G.make_guiders(methods, **settings)

    bench = quality_configs.get_config("mmdit")
    _section(bench.guidance, {k: v for k, v in SETTINGS.items() if k != "scale"})
    guidance = bench.guidance.to_dict()
    out["launch.quality"] = {
        m: quality.bench_guider(m, SETTINGS["scale"], guidance) for m in methods.split(",")
    }

    quick = quickstart_configs.get_config()
    with quick.guidance.unlocked():
        del quick.guidance.cfg["scale"], quick.guidance.erg["scale"]
    quick.guidance.methods = methods
    _section(quick.guidance, SETTINGS)
    out["launch.quickstart"] = quickstart.make_guiders(quick)

    probe = entropy_configs.get_config("mmdit")
    _section(probe.guidance, SETTINGS)
    out["launch.entropy"] = {}
    for m in methods.split(","):
        probe.method = m
        out["launch.entropy"][m] = entropy.probe_guider(probe)
    return out


def test_every_entry_point_builds_the_same_guider():
    methods = ",".join(METHODS)
    reference = {m: G.make_guider(m, **SETTINGS) for m in METHODS}
    for entry, guiders in _entry_points(methods).items():
        assert list(guiders) == list(METHODS), entry
        for m in METHODS:
            _same(guiders[m], reference[m], f"{entry}: {m}")
    # the settings reached the guiders (a dropped section would leave the defaults)
    erg = reference["erg+apg"].terms[0]
    assert float(erg.energy.tau) == np.float32(0.3) and int(erg.energy_steps) == 2
    assert float(erg.apg.momentum) == np.float32(-0.4)
    assert float(reference["erg+cache"].cache.every) == 3.0
    assert float(reference["cfg"].rescale) == np.float32(0.3)


def _float32(tree):
    return jax.tree_util.tree_map(
        lambda x: np.float32(x) if isinstance(x, int | float) and not isinstance(x, bool) else x,
        tree,
    )


def test_rule_methods_are_cfg_under_the_rule():
    for name, fn in (("tcfg", G.tcfg), ("mambo", G.mambo), ("cfg_zero_star", G.cfg_zero_star)):
        _same(G.make_guider(name), _float32(fn().replace(name=name)), name)
    _same(G.make_guider("apg_mix"), _float32(G.apg_mix()), "apg_mix")
    _same(G.make_guider("fdg"), _float32(G.fdg()), "fdg")


def test_defaults_are_the_factories_and_one_per_setting():
    d = G.defaults()
    assert d["erg"]["tau"] == 0.5 and d["erg"]["tau_c"] == 1.0 and d["erg"]["layers"] == ""
    assert d["apg"] == {"momentum": 0.0, "norm_threshold": float("inf"), "eta": 0.0}
    assert d["cache"]["every"] == 2 and d["apg_mix"]["apg_scale"] == 10.0
    job = dit_configs.get_config("tiny").guidance
    for name, section in d.items():
        for key, value in section.items():
            if name in ("erg", "pag", "seg", "slg") and key == "layers":
                continue  # each architecture's layer recipes
            assert job[name][key] == value, f"{name}.{key}"


def test_a_modifier_refuses_a_setting_it_does_not_take():
    G.make_guider("apg", apg={"interval": (0.0, 0.5)})  # the method takes a window
    with pytest.raises(ValueError, match="apg.interval is not a setting of the apg modifier"):
        G.make_guider("erg+apg", apg={"interval": (0.0, 0.5)})
    with pytest.raises(ValueError, match="erg.taus is not a setting of erg"):
        G.make_guider("erg", erg={"taus": 0.3})
    with pytest.raises(ValueError, match="no method or modifier is named 'ergg'"):
        G.make_guider("erg", ergg={"tau": 0.3})


@pytest.mark.parametrize("layers", [[False, True, True, False], np.array([0, 1, 1, 0], bool)])
def test_a_python_or_numpy_boolean_mask_is_a_mask(layers):
    for name in ("erg", "pag", "seg", "slg"):
        term = G.make_guider(name, **{name: {"layers": layers}}).terms[0]
        field = {"erg": "energy_layers", "pag": "identity_layers"}.get(name)
        field = field or {"seg": "blur_layers", "slg": "skip_layers"}[name]
        got = np.asarray(getattr(term, field))
        assert got.dtype == np.bool_ and list(got) == [False, True, True, False], name
    assert list(np.asarray(G.erg(layers="1, 2").terms[0].energy_layers)) == [1, 2]


def test_erg_that_perturbs_nothing_is_refused_by_name():
    with pytest.raises(ValueError, match="erg perturbs nothing"):
        G.erg(image_energy=False)
    with pytest.raises(ValueError, match="erg perturbs nothing"):
        G.make_guider("erg", erg={"image_energy": False, "condition": "cond", "tau_c": 0.5})
    # C-ERG alone, or the tempered null branch, perturb something
    assert G.erg(image_energy=False, tau_c=0.5).terms[0].energy is None
    assert G.erg(image_energy=False, condition="null").terms[0].condition == "null"


def test_sweeps_read_values_as_the_settings_type_and_name_the_field():
    flags = G.make_guiders("erg", sweep="erg.image_energy=True,False", erg={"tau_c": 0.5})
    assert flags["erg_image_energyTrue"].terms[0].energy is not None
    assert flags["erg_image_energyFalse"].terms[0].energy is None
    taus = G.make_guiders("erg", sweep="erg.tau_c=0.5,0.8")
    assert [G.tempered_tau_c(g) for g in taus.values()] == [0.5, np.float32(0.8)]
    with pytest.raises(ValueError, match="guidance.sweep: erg.tau takes float values"):
        G.make_guiders("erg", sweep="erg.tau=0.3,high")
    with pytest.raises(ValueError, match="guidance.sweep: erg.image_energy takes True or False"):
        G.make_guiders("erg", sweep="erg.image_energy=yes")
    with pytest.raises(ValueError, match="guidance.sweep: 'erg.taux' is not a guidance setting"):
        G.make_guiders("erg", sweep="erg.taux=1,2")


class _Encoder:
    """A text encoder whose output is its layers' temperature: tau_c reaches the table."""

    def tokenize(self, texts):
        return np.ones((len(texts), 3), np.int32), np.ones((len(texts), 3), bool)

    def encode_branches(self, ids, mask, energies):
        taus = jnp.asarray([float(e.tau) for e in energies])
        hidden = jnp.ones((len(energies),) + ids.shape + (2,)) * taus[:, None, None, None]
        return {"hidden_state": hidden}


def test_a_sweep_over_tau_c_encodes_each_value():
    guiders = G.make_guiders("erg", sweep="erg.tau_c=0.5,0.8")
    values = sorted({G.tempered_tau_c(g) for g in guiders.values()})
    table = TextConditions([_Encoder()], ["a", "b"], values, "single")
    idx = np.arange(2)
    seen = [float(table.slots(idx, v)["tempered"]["context"][0, 0, 0]) for v in values]
    assert seen == pytest.approx([0.5, 0.8])
    assert float(table.slots(idx, 0.5)["cond"]["context"][0, 0, 0]) == 1.0
    with pytest.raises(ValueError, match="tau_c 0.7 was not encoded"):
        table.slots(idx, 0.7)


def test_the_job_refuses_c_erg_on_a_class_model():
    from erg_jax.jobs.job_setup import make_methods

    config = dit_configs.get_config("tiny")
    config.guidance.erg.tau_c = 0.5
    with pytest.raises(ValueError, match="guidance.erg.tau_c: erg tempers a text encoder"):
        make_methods(config, text=False)


def test_configs_hold_sections_not_flat_fields():
    section = dit_configs.get_config("tiny").guidance
    assert isinstance(section.erg, ml_collections.ConfigDict)
    assert not {"tau", "layers", "apg_momentum", "cache_every", "pag_layers"} & set(section)


def test_names_in_the_wrong_place_are_refused_by_name():
    for method, bad in (("erg+cads+pag", "'pag'"), ("erg+foo", "'foo'"), ("cads", "'cads'")):
        with pytest.raises(ValueError, match=f"unknown or misplaced method {bad}"):
            G.make_guider(method)
    with pytest.raises(ValueError, match="'none\\+cache': the cache reuses weak branches; none "):
        G.make_guider("none+cache")
    assert G.make_guider("cfg+pag").num_branches == 3  # two bases before any modifier


def test_the_tempered_condition_is_the_one_term_that_tempers():
    assert G.tempered_tau_c(G.make_guider("cfg+erg", erg={"tau_c": 0.5})) == 0.5
    assert G.tempered_tau_c(G.make_guider("cfg+pag")) == 1.0
    two = G.compose(G.erg(tau_c=0.5), G.erg(tau_c=0.7))
    with pytest.raises(ValueError, match=r"its terms ask for tau_c \[0.5, 0.7"):
        G.tempered_tau_c(two)


def test_a_sweep_names_what_it_cannot_vary():
    scales = G.make_guiders("cfg,erg", sweep="scale=2,3")
    assert sorted(scales) == ["cfg_scale2", "cfg_scale3", "erg_scale2", "erg_scale3"]
    assert float(scales["erg_scale3"].terms[0].weight.scale) == 3.0
    for sweep in ("scale=", "erg.tau.x=1,2"):
        with pytest.raises(ValueError, match="guidance.sweep must be 'FIELD=v1,v2'"):
            G.make_guiders("erg", sweep=sweep)
    for sweep in ("foo=1,2", "interval=0,1"):
        with pytest.raises(ValueError, match="is not a guidance setting .scale, shape, or"):
            G.make_guiders("erg", sweep=sweep)
    section = dit_configs.get_config("tiny").guidance
    section.sweep = "distilled=1,2"
    with pytest.raises(ValueError, match="cannot vary guidance.distilled"):
        G.guiders_from_section(section)
