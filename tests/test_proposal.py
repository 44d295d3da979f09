"""The entropy probe's proposed ERG target: the stated rule on measured entropies, in the
model's own block names, and the quality bench's row for it."""

import json

import numpy as np
import pytest

from erg_jax import guidance as G
from erg_jax.jobs import quality
from erg_jax.jobs.entropy import proposal


def _result(gain_per_head, taus=(0.1, 0.5, 1.0), steps=2):
    """Entropies (T, steps, L, H) whose gain from tau = 1 to tau (lowest: the full gain)
    is ``gain_per_head`` scaled by (1 - tau) / (1 - lowest)."""
    gain = np.asarray(gain_per_head, np.float64)
    base = np.full(gain.shape, 2.0)
    ent = [
        np.broadcast_to(base + gain * (1 - t) / (1 - taus[0]), (steps,) + gain.shape) for t in taus
    ]
    return {"taus": list(taus), "denoiser": {"entropy": np.stack(ent).tolist()}}


def test_the_top_quarter_of_layers_by_gain_in_block_names():
    layout = G.Layout((("double_blocks", 4), ("single_blocks", 4)), 2)
    gains = [
        [0.1, 0.1],
        [0.2, 0.2],
        [0.9, 0.8],
        [0.1, 0.1],
        [0.0, 0.0],
        [0.7, 0.7],
        [0.3, 0.3],
        [0.1, 0.1],
    ]
    p = proposal(_result(gains), layout)
    assert p["chosen"] == [2, 5]  # 8 layers: the top 2
    assert p["layers"] == "double_blocks.2,single_blocks.1"  # heads spread evenly: whole layers
    np.testing.assert_array_equal(G.resolve(p["layers"], layout), [2, 5])
    assert p["gain"][2] == pytest.approx(0.85)
    # half the full gain is reached at tau 0.5 ((1 - 0.5) / 0.9 = 0.56 of it): tau 0.5
    assert p["tau"] == 0.5


def test_heads_are_named_where_the_gain_is_concentrated():
    layout = G.Layout((("joint_blocks", 4),), 4)
    gains = [[0.0] * 4, [1.0, 0.05, 0.9, 0.05], [0.1] * 4, [0.0] * 4]
    p = proposal(_result(gains, taus=(0.01, 1.0)), layout)
    assert p["layers"] == "joint_blocks.1@0+2"
    mask = G.resolve(p["layers"], layout)
    assert mask.shape == (4, 4) and np.argwhere(mask).tolist() == [[1, 0], [1, 2]]
    assert p["tau"] == 0.01  # no probe tau between the lowest and the reference


def test_the_bench_reads_a_proposal_and_refuses_a_file_without_one(tmp_path):
    good, bad = tmp_path / "entropy.json", tmp_path / "other.json"
    good.write_text(json.dumps({"proposal": {"layers": "blocks.0", "tau": 0.3}}))
    bad.write_text(json.dumps({"taus": [1.0]}))
    assert quality.read_proposal(str(good)) == {"layers": "blocks.0", "tau": 0.3}
    with pytest.raises(ValueError, match="holds no proposal"):
        quality.read_proposal(str(bad))
