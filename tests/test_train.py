"""Training (erg_jax.jobs.train) and the shipped demo models (models/).

- a tiny rectified-flow run, data parallel over 8 fake devices, lowers the loss;
- a run killed after its last checkpoint and started again continues with exactly the
  loss curve of an uninterrupted run (batches and noise depend only on (seed, step));
- fine-tuning (train.init_from) starts from the exported params, refuses another model;
- the shipped DiT, MMDiT and classifier load, and their samples with CFG match their
  condition (classifier-read shape and colour) clearly more often than unguided ones.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import train_shapes
from erg_jax import checkpoint, data, metrics
from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax.jobs import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")


def tiny_config(**train_fields):
    c = train_shapes.get_config("tiny")
    c.export = ""
    c.train.update(train_fields)
    return c


def test_init_from_starts_at_the_exported_params(tmp_path, uninterrupted):
    exported = str(tmp_path / "exported")
    train.export(exported, uninterrupted["state"].ema, uninterrupted["model_config"])
    c = tiny_config(init_from=exported, steps=0)
    start = train.run(c, str(tmp_path / "ft0"))["state"]
    for got in (start.params, start.ema):
        diffs = jax.tree_util.tree_map(
            lambda a, b: float(jnp.max(jnp.abs(a - b))), got, uninterrupted["state"].ema
        )
        assert max(jax.tree_util.tree_leaves(diffs)) == 0.0
    assert int(start.step) == 0
    # the fine-tuned run's loss starts at the trained model's level, not a fresh one's
    ft = train.run(tiny_config(init_from=exported, steps=2), str(tmp_path / "ft"))
    assert ft["losses"][1] < uninterrupted["losses"][1]
    wider = tiny_config(init_from=exported)
    wider.model.overrides.hidden_size = 48
    with pytest.raises(ValueError, match="model.hidden_size=32"):
        train.run(wider, str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="not an exported model folder"):
        train.run(tiny_config(init_from=str(tmp_path)), str(tmp_path / "bad2"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train.run(tiny_config(), str(tmp_path_factory.mktemp("full")))


def test_tiny_run_on_8_devices_lowers_the_loss(uninterrupted):
    assert jax.device_count() == 8
    losses = [uninterrupted["losses"][n] for n in sorted(uninterrupted["losses"])]
    assert len(losses) == train_shapes.get_config("tiny").train.steps
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.85 * first, (first, last)
    # The EMA moved away from the initial params, towards the trained ones.
    init = train.init_params(uninterrupted["model_config"], jax.random.key(0))
    ema = uninterrupted["state"].ema
    gap = lambda a, b: sum(  # noqa: E731
        float(jnp.sum(jnp.square(x - y)))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )
    assert 0 < gap(ema, uninterrupted["state"].params) < gap(init, uninterrupted["state"].params)


def test_killed_and_resumed_run_repeats_the_loss_curve(uninterrupted, tmp_path):
    config = tiny_config()
    k, total = config.train.checkpoint_every, config.train.steps
    killed_at = 2 * k + 3  # three steps past the last checkpoint: those are lost
    first = train.run(config, str(tmp_path), stop_at=killed_at)
    assert max(first["losses"]) == killed_at
    resumed = train.run(config, str(tmp_path))
    # The fresh call starts from the last checkpoint, not from scratch nor from the kill.
    assert min(resumed["losses"]) == 2 * k + 1 and max(resumed["losses"]) == total
    steps = sorted(resumed["losses"])
    np.testing.assert_allclose(
        [resumed["losses"][n] for n in steps],
        [uninterrupted["losses"][n] for n in steps],
        rtol=0,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        [first["losses"][n] for n in range(1, killed_at + 1)],
        [uninterrupted["losses"][n] for n in range(1, killed_at + 1)],
        atol=1e-5,
    )
    for a, b in zip(
        jax.tree_util.tree_leaves(resumed["state"].ema),
        jax.tree_util.tree_leaves(uninterrupted["state"].ema),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


# --- the shipped models ----------------------------------------------------------------

NUM, STEPS, SCALE, SEED = 16, 20, 3.0, 0
# Consistency (shape and colour both read back right) of the 16 held-out conditions of
# seed 0, 20 Euler steps, measured on the shipped models (4,000 steps each):
#   DiT:   none 0.1875, CFG 3: 0.375 (32 conditions: 0.25 -> 0.406);
#   MMDiT: none 0.4375, CFG 3: 0.5625 (32 conditions: 0.406 -> 0.4375).
# The MMDiT's unguided samples already follow the caption's colour, size and position,
# and neither model draws crisp shapes yet, so CFG's gain is mostly colour (DiT) and a
# little shape. The margins below leave one sample (1/16) of slack for other platforms.
MARGIN = {"dit": 0.125, "mmdit": 0.0625}


def _shipped(name: str) -> str:
    path = os.path.join(MODELS, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        pytest.skip(f"models/{name} is absent (train it: configs/train_shapes.py docstring)")
    return path


def _consistency(denoiser, config, conds, cond_set, classifier) -> dict:
    """Consistency of unguided and CFG samples of the held-out conditions."""
    keys = S.sample_keys(SEED, jnp.arange(NUM))
    noise = S.initial_noise(keys, (data.IMAGE_SIZE, data.IMAGE_SIZE, 3))
    sampler = S.make_sampler("euler", STEPS, time=config["time"])
    layers = int(config["num_layers"])
    run = jax.jit(
        lambda g: S.sample(denoiser, noise, conds, g, sampler, keys=keys, num_layers=layers)
    )
    out = {}
    for name, guider in (("none", G.none()), ("cfg", G.cfg(SCALE))):
        read = classifier(np.clip(np.asarray(run(guider)), -1.0, 1.0))
        out[name] = metrics.consistency(
            read["shape"], read["colour"], cond_set["shape"], cond_set["colour"]
        )
    return out


@pytest.fixture(scope="module")
def classifier():
    from erg_jax.models.classifier import load_classifier

    clf = load_classifier(_shipped("classifier"))
    held = data.make_dataset(500, data.HELDOUT_SEED)
    read = clf(held["images"])
    # The judge itself reads real held-out images almost perfectly.
    assert metrics.consistency(read["shape"], read["colour"], held["shape"], held["colour"]) > 0.9
    assert clf.features(held["images"][:4]).shape == (4, clf.config["features"])
    return clf


def test_shipped_dit_cfg_beats_no_guidance(classifier):
    from erg_jax.models import load_denoiser

    path = _shipped("demo-dit")
    den, config = load_denoiser(path), checkpoint.read_config(path)
    assert config["time"] == "sd3" and config["prediction"] == "velocity"
    cond_set = data.make_dataset(NUM, data.HELDOUT_SEED)
    labels = jnp.asarray(cond_set["label"], jnp.int32)
    conds = {"cond": labels, "null": jnp.full_like(labels, data.NUM_CLASSES)}
    score = _consistency(den, config, conds, cond_set, classifier)
    assert score["cfg"] >= score["none"] + MARGIN["dit"], score


def test_shipped_mmdit_cfg_beats_no_guidance(classifier):
    from erg_jax.models import load_denoiser

    path = _shipped("demo-mmdit")
    den, cfg = load_denoiser(path), checkpoint.read_config(path)
    cond_set = data.make_dataset(NUM, data.HELDOUT_SEED)
    table = train.encode_texts(
        list(cond_set["caption"]) + [""], cfg["text_encoder"], cfg["text_max_length"]
    )
    conds = {
        "cond": {k: jnp.asarray(v[:NUM]) for k, v in table.items()},
        "null": {k: jnp.asarray(np.repeat(v[NUM:], NUM, axis=0)) for k, v in table.items()},
    }
    score = _consistency(den, cfg, conds, cond_set, classifier)
    assert score["cfg"] >= score["none"] + MARGIN["mmdit"], score
