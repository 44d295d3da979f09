"""The negative-prompt bench on the shipped text model: every row, the auto-chosen colour
(the unguided samples' most common), its share per row, and the refusals."""

import json
import os

import pytest

from tests.test_quality import ROOT, shipped


@shipped
def test_the_negative_mode_writes_its_rows(tmp_path, monkeypatch):
    from configs import quality as cfg
    from erg_jax.jobs.quality import run_config

    monkeypatch.chdir(ROOT)
    c = cfg.get_config("tiny")
    c.model, c.mode = "mmdit", "negative"
    c.num_samples, c.num_real = 16, 32
    c.negative.methods = "none,nag"
    rows = run_config(c, str(tmp_path))
    saved = json.load(open(tmp_path / "negative.json"))
    assert saved["rows"] == rows and [r["method"] for r in rows] == ["none", "nag"]
    none = rows[0]["colour_shares"]
    assert saved["colour"] == max(none, key=none.get)  # "auto": the unguided mode colour
    for r in rows:
        assert abs(sum(r["colour_shares"].values()) - 1.0) < 1e-9
        assert r["negative_share"] == r["colour_shares"][saved["colour"]]
    assert rows[1]["nfe"] == rows[0]["nfe"] == c.steps  # NAG: one forward per step
    assert os.path.getsize(tmp_path / "negative.md") > 0
    c.negative.colour = "teal"
    with pytest.raises(ValueError, match="negative.colour must be 'auto' or one of"):
        run_config(c, str(tmp_path))
    c.model, c.negative.colour = "dit", "red"
    with pytest.raises(ValueError, match="needs the text model"):
        run_config(c, str(tmp_path))
