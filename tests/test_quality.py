"""The quality bench and the quickstart run on the shipped models and write complete results."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = all(
    os.path.isdir(os.path.join(ROOT, "models", m)) for m in ("demo-dit", "demo-mmdit", "classifier")
)
shipped = pytest.mark.skipif(not SHIPPED, reason="the shipped models (models/) are absent")


@shipped
@pytest.mark.slow
@pytest.mark.parametrize("model", ["dit", "mmdit"])
def test_bench_writes_every_row_and_figure(model, tmp_path, monkeypatch):
    from configs import quality as cfg
    from erg_jax.jobs.quality import run_config

    monkeypatch.chdir(ROOT)
    c = cfg.get_config("tiny")
    c.model = model
    rows = run_config(c, str(tmp_path))
    names = {r["method"] for r in rows}
    assert {"none", "cfg", "erg", "uncond erg"} <= names
    if model == "mmdit":
        assert {"c-erg@0.5", "c-erg@2"} <= names
    for r in rows:
        for key in ("fd", "density", "coverage", "consistency", "nfe", "seconds"):
            assert key in r and r[key] == r[key], (r["method"], key)
    assert rows[[r["method"] for r in rows].index("cfg")]["nfe"] == 2 * c.steps
    for name in ("results.json", "results.md", "pareto.png"):
        assert os.path.getsize(tmp_path / name) > 0
    assert json.load(open(tmp_path / "results.json")) == rows


@shipped
@pytest.mark.slow
def test_search_ranks_erg_settings_against_cfg_on_other_conditions(tmp_path, monkeypatch):
    from configs import quality as cfg
    from erg_jax import data
    from erg_jax.jobs.quality import run_config

    monkeypatch.chdir(ROOT)
    c = cfg.get_config("tiny")
    c.model, c.mode = "dit", "search"
    c.search.taus = (0.3, 0.9)
    c.search.kappas, c.search.refine = (0.0, 0.25), 1
    rows = run_config(c, str(tmp_path))
    saved = json.load(open(tmp_path / "search.json"))
    assert saved["rows"] == rows and len(rows) == 5  # 2 taus x 2 layer sets, then 1 kickoff
    first = [r for r in rows if r["stage"] == 1]
    assert {(r["tau"], r["layers"], r["kappa"]) for r in first} == {
        (t, la, 0.0) for t in (0.3, 0.9) for la in ("all", "0")
    }
    # stage 2 refines the best of stage 1 with the other kickoff
    (second,) = [r for r in rows if r["stage"] == 2]
    assert (second["tau"], second["layers"], second["kappa"]) == (
        first[0]["tau"],
        first[0]["layers"],
        0.25,
    )
    ref = saved["cfg"]
    for r in rows:
        want = min(r[k] / ref[k] for k in ("density", "coverage", "consistency"))
        assert abs(r["worst_ratio"] - want) < 1e-9
    order = [(-r["worst_ratio"], r["fd"]) for r in rows]
    assert order == sorted(order)  # best worst ratio first, ties to the lower FD
    assert (tmp_path / "search.md").read_text().count("\n") == 2 + 1 + len(rows)
    # the tuning conditions follow the bench's: none is shared
    bench = data.split("heldout", c.num_samples, start=c.num_real)["images"]
    tune = data.split("heldout", c.num_samples, start=c.num_real + c.num_samples)["images"]
    assert not any(np.array_equal(a, b) for a in bench for b in tune)
    c.mode = "tune"
    with pytest.raises(ValueError, match="mode"):
        run_config(c, str(tmp_path))


@shipped
@pytest.mark.slow
def test_main_job_without_torch_writes_a_labelled_grid_metrics_and_report(tmp_path):
    """The README's main job, run with torch and diffusers unimportable (the demo
    installs neither): its grid's left band names each method, its page (read in
    headless Chromium) lists methods and prompts, metrics.md has the table."""
    import re
    import subprocess
    import sys

    from PIL import Image
    from test_report import _rendered

    from configs import quickstart
    from erg_jax.jobs import report

    block = (
        "import sys, runpy; sys.modules['torch'] = sys.modules['diffusers'] = None; "
        "sys.argv = ['quickstart', '--config=configs/quickstart.py:runlocal', "
        f"'--workdir={tmp_path}']; "
        "runpy.run_module('launch.quickstart', run_name='__main__')"
    )
    run = subprocess.run(
        [sys.executable, "-c", block], cwd=ROOT, check=True, capture_output=True, text=True
    )
    # what a user sees is the table, not the libraries' INFO lines nor transformers'
    # advice to install torch (launch/logs.py; tests/test_logs.py: --verbose shows them)
    shown = run.stdout + run.stderr
    assert "| method |" in shown and "wrote " in shown
    assert not re.search(r"^I\d{4} ", shown, re.M), shown[-3000:]
    assert "PyTorch was not found" not in shown
    config = quickstart.get_config("runlocal")
    methods = config.guidance.methods.split(",")
    prompts = config.prompts.split("|")
    saved = json.load(open(tmp_path / "metrics.json"))
    assert list(saved["methods"]) == methods
    table = (tmp_path / "metrics.md").read_text().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == methods
    grid = np.asarray(Image.open(tmp_path / "grid.png"))[..., 0]
    # each method at its own weight: its first term's section (cfg, or erg for erg+apg)
    weight = {m: config.guidance[m.split("+")[0]].scale for m in methods if m != "none"}
    assert weight == {"cfg": 4.0, "erg": 1.5, "erg+apg": 1.5}
    labels = [m if m == "none" else f"{m} (w={weight[m]:g})" for m in methods]
    left, top = report.label_bands(labels, prompts, 32 * 3)
    h = (grid.shape[0] - top) // len(methods)
    for i, label in enumerate(labels):
        band = grid[top + i * h : top + (i + 1) * h, :left]
        np.testing.assert_array_equal(band, report.draw_label(label, (h, left)))
    page = _rendered(tmp_path / "index.html")
    assert [r[0] for r in page.rows if r] == methods
    assert page.items == prompts
    assert page.img.get("data-width") == str(grid.shape[1])


# A perfect generator and an oracle reader, so that the bench's numbers are known without
# any model: the denoiser's velocity (x - c) / t takes Euler exactly onto the image c its
# condition holds; the classifier names the nearest held-out image's shape and colour.
NUM_REAL, NUM_SAMPLES, K, STEPS = 24, 16, 3, 2
_PROJECTION = np.random.default_rng(0).normal(size=(32 * 32 * 3, 8))


def _features(images):
    return np.asarray(images, np.float64).reshape(len(images), -1) @ _PROJECTION


def _oracle(pool):
    flat = pool["images"].reshape(len(pool["images"]), -1)

    def classify(images):
        nearest = cdist(np.asarray(images).reshape(len(images), -1), flat).argmin(axis=1)
        return dict(
            shape=pool["shape"][nearest],
            colour=pool["colour"][nearest],
            features=_features(images),
        )

    return classify


def _perfect_model():
    from erg_jax.jobs.quality import DemoModel

    def denoiser(x, t, cond, attention=None):
        return (x - cond) / t.reshape(-1, 1, 1, 1)

    def conditions(cond_set, unconditional=False, tau_c=None):
        images = jnp.asarray(cond_set["images"])
        zeros = jnp.zeros_like(images)
        return {"cond": zeros if unconditional else images, "null": zeros}

    return DemoModel("toy", denoiser, 1, (32, 32, 3), "unit", conditions)


def _bench_config():
    from configs import quality as cfg

    c = cfg.get_config("tiny")
    c.num_real, c.num_samples, c.nearest_k, c.steps = NUM_REAL, NUM_SAMPLES, K, STEPS
    c.methods, c.uncond_methods, c.weights = "none,cfg", "none", (1.0,)
    return c


def _reference_frechet(a, b):
    diff = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return diff @ diff + np.trace(sa + sb) - 2 * np.trace(scipy.linalg.sqrtm(sa @ sb).real)


def test_bench_scores_a_perfect_generator_against_held_out_images(tmp_path):
    from erg_jax import data
    from erg_jax.jobs.quality import run_bench

    pool = data.split("heldout", NUM_REAL + NUM_SAMPLES)
    rows = run_bench(_perfect_model(), _oracle(pool), _bench_config(), str(tmp_path))
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"none", "cfg", "uncond none"}
    # The bench draws the conditions after its real images: the generator reproduces
    # held-out images NUM_REAL .. NUM_REAL + NUM_SAMPLES - 1, scored against the first NUM_REAL.
    real, fake = _features(pool["images"][:NUM_REAL]), _features(pool["images"][NUM_REAL:])
    d = cdist(real, fake)
    radii = np.sort(cdist(real, real), axis=1)[:, K]  # the point itself is the 0th
    for method in ("none", "cfg"):  # CFG at weight 1 is the conditional branch
        row = by_method[method]
        assert row["consistency"] == row["shape_accuracy"] == row["colour_accuracy"] == 1.0
        np.testing.assert_allclose(row["fd"], _reference_frechet(real, fake), rtol=1e-4)
        np.testing.assert_allclose(row["density"], (d < radii[:, None]).sum(0).mean() / K)
        np.testing.assert_allclose(row["coverage"], (d.min(1) < radii).mean())
    assert (by_method["none"]["nfe"], by_method["cfg"]["nfe"]) == (STEPS, 2 * STEPS)
    # Unconditional: every sample is the null image (zeros), read as one fixed attribute pair.
    read = _oracle(pool)(np.zeros((1, 32, 32, 3)))
    hit = (pool["shape"][NUM_REAL:] == read["shape"][0]) & (
        pool["colour"][NUM_REAL:] == read["colour"][0]
    )
    assert by_method["uncond none"]["consistency"] == hit.mean() < 0.5


def test_scores_of_generated_copies_of_the_real_set():
    from erg_jax import data
    from erg_jax import guidance as G
    from erg_jax.jobs.quality import Scorer

    c = _bench_config()
    c.num_samples = c.num_real
    pool = data.split("heldout", c.num_real)
    scorer = Scorer(_perfect_model(), _oracle(pool), c, start=0, seed=0)
    row = scorer.score(G.none(), scorer.conditions(G.none()))
    assert abs(row["fd"]) < 1e-6
    for key in ("precision", "recall", "coverage", "consistency"):
        assert row[key] == 1.0, key


def test_cached_methods_and_their_forward_counts():
    from erg_jax import guidance as G
    from erg_jax import samplers as S
    from erg_jax.jobs.quality import forwards

    erg = dict(tau=0.5, layers=None, kappa=0.0)
    sampler = S.make_sampler("euler", 20)
    erg3 = G.make_guider("erg+cache", scale=2.0, erg=erg, cache={"every": 3})
    assert erg3.cache is not None and int(erg3.cache.every) == 3
    assert forwards(G.make_guider("erg", scale=2.0, erg=erg), sampler) == 40
    assert forwards(erg3, sampler) == 20 + 7  # weak branch at steps 0, 3, ..., 18
    assert forwards(G.make_guider("cfg+cache", scale=2.0), sampler) == 30  # every 2: default
    assert forwards(G.cache(G.cfg(2.0), every=2, window=(0.0, 0.52)), sampler) == 20 + 10 + 5
    with pytest.raises(ValueError, match="cache every must be a whole number"):
        G.make_guider("cfg+cache", cache={"every": 2.5})


def test_the_two_class_conditional_readings_of_erg():
    from erg_jax import guidance as G

    erg = dict(tau=0.5, layers=None, kappa=0.2)
    ours, null = (
        G.make_guider("erg", scale=2.0, erg=dict(erg, condition=c)).terms[0]
        for c in ("auto", "null")
    )
    assert ours.condition == "auto" and null.condition == "null"
    assert float(null.energy.tau) == float(ours.energy.tau) == 0.5


@shipped
@pytest.mark.slow
def test_search_mode_runs_from_the_launcher_and_prints_its_table(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launch.quality", "--config=configs/quality.py:tiny"]
        + ["--config.mode=search", f"--workdir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| stage | tau | layers |" in proc.stdout
    assert (tmp_path / "search.json").is_file() and not (tmp_path / "results.md").exists()
