"""The bench and the main job run on the shipped models and write complete results."""

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = all(
    os.path.isdir(os.path.join(ROOT, "models", m)) for m in ("demo-dit", "demo-mmdit", "classifier")
)
pytestmark = pytest.mark.skipif(not SHIPPED, reason="the shipped models (models/) are absent")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dit", "mmdit"])
def test_bench_writes_every_row_and_figure(model, tmp_path, monkeypatch):
    from configs import evaluate as cfg
    from erg_jax.evaluate import run_config

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


@pytest.mark.slow
def test_main_job_writes_grid_and_metrics(tmp_path, monkeypatch):
    from configs import quickstart
    from erg_jax.demo import run_quickstart

    monkeypatch.chdir(ROOT)
    c = quickstart.get_config("runlocal")
    res = run_quickstart(c, str(tmp_path))
    assert set(res) == {"none", "cfg", "erg", "erg+apg"}
    assert os.path.getsize(tmp_path / "grid.png") > 0
    saved = json.load(open(tmp_path / "metrics.json"))
    assert set(saved["methods"]) == {"none", "cfg", "erg", "erg+apg"}
