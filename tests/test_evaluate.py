"""The bench and the main job run on the shipped models and write complete results."""

import json
import os

import numpy as np
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
def test_search_ranks_erg_settings_against_cfg_on_other_conditions(tmp_path, monkeypatch):
    from configs import evaluate as cfg
    from erg_jax import data
    from erg_jax.evaluate import run_config

    monkeypatch.chdir(ROOT)
    c = cfg.get_config("tiny")
    c.model, c.mode = "dit", "search"
    c.search.taus = (0.3, 0.9)
    rows = run_config(c, str(tmp_path))
    saved = json.load(open(tmp_path / "search.json"))
    assert saved["rows"] == rows and len(rows) == 4  # 2 taus x 2 layer sets
    assert {(r["tau"], r["layers"]) for r in rows} == {
        (t, la) for t in (0.3, 0.9) for la in ("all", "0")
    }
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
