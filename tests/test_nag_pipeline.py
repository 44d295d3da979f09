"""NAG from prompts to images: through the Pipeline on the shipped text MMDiT (negative
prompts as the "null" condition, one forward per step, scale 1 the model itself), a step
of the sampler against the model's own NAG forward built by hand, and on a tiny FLUX.1
beside its distilled guidance embedding."""

import jax.numpy as jnp
import numpy as np
import pytest

from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax import settings as settings_lib
from erg_jax.control import AttentionControl, NAGControl
from erg_jax.pipeline import Pipeline

PROMPTS = ["a small red circle in the upper left", "a large blue square in the center"]
NEGATIVES = "a small green circle in the upper left|a large red square in the center"


@pytest.fixture(scope="module")
def mmdit(tmp_path_factory):
    fields = {"text.negative_prompts": NEGATIVES}
    cache = str(tmp_path_factory.mktemp("cache"))
    return Pipeline.load("models/demo-mmdit", cache_dir=cache, fields=fields)


def test_nag_at_scale_one_is_the_model_and_changes_it_above(mmdit):
    out = mmdit(PROMPTS, methods=("none", "nag"), seed=1, steps=3, nag=dict(scale=1.0))
    np.testing.assert_array_equal(out.images["none"], out.images["nag"])
    guided = mmdit(PROMPTS, methods=("nag",), seed=1, steps=3, nag=dict(scale=5.0))
    assert np.abs(guided.images["nag"].astype(int) - out.images["none"].astype(int)).max() > 8
    assert guided.settings["nag"]["guidance"]["nag"]["scale"] == 5.0


def test_a_sampler_step_is_the_models_nag_forward(mmdit):
    """One Euler step of "nag" equals x + dt * v, v the denoiser's own NAG forward with
    the negative prompts' encoding (the "null" slot) as cond['negative'] and the control
    written out."""
    table = mmdit.encode(PROMPTS)
    conds = table.slots(np.arange(2))
    negatives = mmdit.encode(NEGATIVES.split("|")).slots(np.arange(2))["cond"]
    np.testing.assert_allclose(conds["null"]["context"], negatives["context"], atol=1e-5)
    den = mmdit.make_denoiser(mmdit.params)
    keys = S.sample_keys(0, jnp.arange(2))
    x = S.initial_noise(keys, mmdit.latent_shape)
    sampler = S.make_sampler("euler", 1, time="sd3")
    guider = G.make_guider("nag", nag=dict(scale=4.0, tau=1.5, layers="joint_blocks.1-2"))
    got = S.sample(den, x, conds, guider, sampler, keys=keys, num_layers=4)
    one = jnp.ones((4,), jnp.float32)
    nag = NAGControl(jnp.array([1.0, 4.0, 4.0, 1.0]), 1.5 * one, 0.125 * one, "l1")
    cond = dict(conds["cond"], negative=conds["null"])
    v = den(x, jnp.full((2,), 1000.0), cond, AttentionControl(nag=nag))
    np.testing.assert_allclose(got, x - v, rtol=1e-5, atol=1e-5)  # t: 1 -> 0


def test_nag_on_flux_beside_its_distilled_guidance():
    config = settings_lib.sections("flux", "tiny")
    settings_lib.apply(config, {"sampler.steps": 2, "sampler.batch_size": 8}, "test")
    pipe = Pipeline.from_settings(config)
    assert pipe.layout.nag_alpha == 0.25
    out = pipe(PROMPTS, methods=("none", "nag"), seed=0, nag=dict(scale=1.0))
    np.testing.assert_allclose(
        out.images["none"].astype(int), out.images["nag"].astype(int), atol=1
    )
    strong = pipe(PROMPTS, methods=("nag",), seed=0, nag=dict(scale=5.0, tau=1.2))
    assert not np.array_equal(strong.images["nag"], out.images["none"])
