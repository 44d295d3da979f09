"""``python -m launch.benchmark --small`` end to end: its JSON has every figure, and the
figures that are not times hold (one compile per sweep, parity with diffusers, bfloat16
close to float32, the scan equal to the loop). No timing is asserted."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from metric_models import dinov2_state_dict, tiny_dinov2_config, write_dinov2_folder
from safetensors.numpy import save_file

from erg_jax import Energy, attention_kernels, energy_attention
from erg_jax import energy as energy_module
from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax.jobs.speed import features, setups, wan
from erg_jax.metrics import dinov2, inception
from erg_jax.models import wan as wan_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDERS = ("none", "cfg", "erg", "erg_k3", "erg_all_layers", "erg+apg", "pag", "seg")
GUIDERS += ("cfg_cache2", "erg_cache2")
WAN_STEPS = (*wan.METHODS, "ierg_plain_vmap")
TARGETS = (
    "erg_over_cfg",
    "erg_all_layers_over_cfg",
    "cfg_over_none",
    "erg_cache2_over_cfg",
    "mmdit_erg_over_cfg",
    "scan_over_loop",
    "compile_250_over_25",
    "compiles_per_sweep",
    "attention_over_faster_reference",
    "ours_erg_over_diffusers_cfg",
    "share_of_matmul_rate",
)


FEATURE_NETWORKS = ("Inception-v3", "DINOv2 ViT-S/14", "DINOv2 ViT-L/14")


def _env():
    """One CPU device, programs compiled for speed of compiling: without LLVM's
    optimisations and XLA:CPU's fusion emitters, the ``--small`` run (many tiny programs,
    each run a few times) takes a quarter of its CPU time on 2 cores. No test here asserts
    a time."""
    flags = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")


def _number(x):
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    pytest.importorskip("torch", reason="the peer section needs the `parity` extra")
    pytest.importorskip("diffusers", reason="the peer section needs the `parity` extra")
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = _env()
    cmd = [sys.executable, "-m", "launch.benchmark", "--small", "--repeats=1", f"--out={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_only_runs_the_sections_it_names_and_refuses_others(tmp_path):
    """The README's ``--only=attention,guidance`` path, on the cheapest section."""
    out = tmp_path / "only.json"
    env = _env()
    base = [sys.executable, "-m", "launch.benchmark", "--small", "--repeats=1", "--lengths=16"]
    proc = subprocess.run(
        base + ["--only=attention", f"--out={out}"], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    others = {"guidance", "sampler", "peer", "floor", "bf16", "features", "nag", "wan"}
    assert "attention" in got and not others & set(got)
    assert [row["tokens"] for row in got["attention"]] == [16]
    bad = subprocess.run(
        base + ["--only=attention,speed"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert bad.returncode != 0 and "--only: unknown benchmarks ['speed']" in bad.stderr


@pytest.mark.slow
def test_every_section_has_every_figure(result):
    for row in result["attention"]:
        for name in ("energy_attention", "einsum", "dot_product_attention"):
            assert _number(row[f"{name}_ms"]) and _number(row[f"{name}_mib"])
        assert _number(row["ratio_to_faster_reference"])
    for table in result["guidance"]:
        for name in GUIDERS:
            assert _number(table["step_ms"][name])
            assert _number(table["ratio_to_cfg"][name]) and _number(table["ratio_to_none"][name])
    dit_table, mmdit_table = result["guidance"]
    assert set(dit_table["shared_prefix_saving"]) == {"erg", "pag", "seg"}
    assert set(mmdit_table["shared_prefix_saving"]) == {"erg", "pag", "seg"}
    s = result["sampler"]
    assert all(_number(s["scan_vs_loop"][k]) for k in ("scan_s", "loop_s", "scan_over_loop"))
    assert all(_number(s["compile"][k]) for k in ("compile_s_25_steps", "compile_s_250_steps"))
    for k in ("diffusers_cfg", "ours_cfg", "ours_erg"):
        assert _number(result["peer"]["step_ms"][k])
    for k in ("none", "cfg"):
        f = result["floor"][k]
        assert f["gflop"] > 0 and _number(f["floor_ms"]) and _number(f["share_of_matmul_rate"])
    assert _number(result["bf16"]["bf16_over_f32_time"])
    f = result["features"]
    assert (f["batch_per_device"], f["devices"]) == (2, 1)
    assert [row["network"] for row in f["networks"]] == list(FEATURE_NETWORKS)
    for row in f["networks"]:
        assert all(_number(v) and v > 0 for k, v in row.items() if k != "network")
        rate = row["bf16_images_per_s"] / row["f32_images_per_s"]
        assert row["bf16_over_f32"] == pytest.approx(rate)
    w = result["wan"]
    assert set(w["step_ms"]) == set(w["ratio_to_cfg"]) == set(w["ratio_to_none"]) == set(WAN_STEPS)
    for name in WAN_STEPS:
        assert _number(w["step_ms"][name]) and w["step_ms"][name] > 0
        ratio = w["step_ms"][name] / w["step_ms"]["cfg"]
        assert w["ratio_to_cfg"][name] == pytest.approx(ratio)
    plain = w["step_ms"]["ierg_plain_vmap"]
    assert w["shared_prefix_saving"]["ierg"] == pytest.approx(1 - w["step_ms"]["ierg"] / plain)
    assert set(result["targets"]) == set(TARGETS)
    assert all(isinstance(t["met"], bool) for t in result["targets"].values())


@pytest.mark.slow
def test_figures_that_are_not_times_hold(result):
    assert result["sampler"]["sweep"] == {"settings": 8, "compiles": 1}
    assert result["targets"]["compiles_per_sweep"]["met"]
    assert result["sampler"]["scan_vs_loop"]["max_abs_difference"] < 1e-3
    assert result["peer"]["output_relative_difference"] < 1e-4  # same weights, same network
    assert 0 < result["bf16"]["relative_error"] < 0.1
    wan_shape = {k: result["wan"][k] for k in ("layers", "tokens", "text_tokens", "solver")}
    assert wan_shape == {"layers": 4, "tokens": 8, "text_tokens": 8, "solver": "unipc"}
    # Twice the branches of an unguided step cost twice its FLOPs.
    flops = result["floor"]
    assert flops["cfg"]["gflop"] == pytest.approx(2 * flops["none"]["gflop"], rel=0.05)


def test_wan_section_times_the_paths_its_rows_name():
    """The Wan rows differ where their names say: ERG and I-ERG perturb the middle half
    (blocks 1-2 of 4), SLG skips block 2; the recipe's ERG reads the tempered text, so its
    branches run whole, while I-ERG alone goes through ``branched`` (the shared prefix)
    and its ``_plain_vmap`` twin does not. Traced abstractly: nothing compiled or timed."""
    layout = wan_model.layout(wan_model.wan_config("tiny", num_layers=4))
    gs = {k: G.resolve_targets(g, layout) for k, g in wan.guiders(4).items()}
    assert G.tempered_tau_c(gs["erg"]) == 0.5 and G.tempered_tau_c(gs["ierg"]) == 1.0
    assert float(gs["erg_cache2"].cache.every) == 2 and gs["cfg+slg"].num_branches == 3
    for name, on in (("erg", [0, 1, 1, 0]), ("ierg", [0, 1, 1, 0]), ("cfg+slg", [0, 0, 1, 0])):
        weak = gs[name].controls(jnp.float32(0.5), 4, 0.1)[-1]
        perturbed = weak.skip if name == "cfg+slg" else 1.0 - weak.energy.tau
        np.testing.assert_array_equal(np.asarray(perturbed) > 0, np.asarray(on, bool))

    cfg = wan.sizes(small=True)[0]
    st = wan.wan_setup(small=True, params=wan_model.abstract_params(cfg))

    def branched_calls(name, plain=False):
        calls = []

        def step(params):
            model = wan_model.make_denoiser(cfg, params)

            def den(x, t, c, a=None):
                return model(x, t, c, a)

            def branched(*args):
                calls.append(name)
                return model.branched(*args)

            if not plain:
                den.branched = branched
            keys, x = st.noise()
            fn = S.make_step(den, st.conds, gs[name], st.sampler, keys, st.num_layers)
            return fn(S.initial_carry(gs[name], x, den, st.sampler), jnp.int32(0))

        jax.eval_shape(step, wan_model.abstract_params(cfg))
        return len(calls)

    assert branched_calls("ierg") == 1 and branched_calls("ierg", plain=True) == 0
    assert branched_calls("erg") == 0 and branched_calls("cfg") == 0


def test_chunked_attention_equals_the_einsum_path():
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (2, 96, 4, 8))
    k = jax.random.normal(ks[1], (2, 80, 2, 8))
    v = jax.random.normal(ks[2], (2, 80, 2, 8))
    bias = jax.random.normal(ks[3], (2, 4, 96, 80))
    mask = jnp.ones((1, 1, 96, 80), bool).at[:, :, ::3, 5:].set(False)
    e = Energy(tau=jnp.linspace(0.3, 1.5, 4), alpha=0.9, gamma=0.7)
    kw = dict(bias=bias, mask=mask, steps=2)
    ref = energy_attention(q, k, v, e, implementation="einsum", **kw)
    out = energy_attention(q, k, v, e, implementation="chunked", **kw)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def _cached_step(carry, i):
    """A sampling step's shape, (x, cache) -> (x, cache): the cache refreshed on even
    steps, x moved by it and by the step index."""
    x, cache = carry
    cache = jnp.where(i % 2 == 0, 0.5 * x + i, cache)
    return x + cache + i, cache


def test_stepper_walks_the_grid_and_starts_over():
    # A toy step, jitted with its carry donated as ``setups.jitted_step`` jits a DiT's;
    # the walk is known in closed form (the DiT's setup and step compile for half a minute).
    fn = jax.jit(_cached_step, donate_argnums=0)
    carry = (jnp.arange(3.0), jnp.zeros(3))
    walk, state = [], (np.arange(3.0), np.zeros(3))
    for i in range(4):
        state = _cached_step(state, i)
        walk.append(np.asarray(state[0]))
    stepper = setups.Stepper(fn, carry, 2)
    first = [np.asarray(stepper()[0]) for _ in range(2)]
    again = [np.asarray(stepper()[0]) for _ in range(2)]  # from the start, as it was
    for got in (first, again):
        np.testing.assert_array_equal(got, walk[:2])
    # a cached guider's cycle: two steps a call, the same walk
    one, two = setups.Stepper(fn, carry, 4), setups.Stepper(fn, carry, 4, per_call=2)
    singles = [np.asarray(one()[0]) for _ in range(4)]
    pairs = [np.asarray(two()[0]) for _ in range(3)]
    np.testing.assert_array_equal(singles, walk)
    np.testing.assert_array_equal(pairs, [walk[1], walk[3], walk[1]])


def _numpy_energy_attention(q, k, v, tau, alpha, gamma, bias, mask, steps):
    """Hand-written energy attention in float64: tau (b, n, h), grouped-query heads."""
    q, k, v, tau, bias = (np.asarray(a, np.float64) for a in (q, k, v, tau, bias))
    mask = np.asarray(mask)
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    t = np.transpose(tau, (0, 2, 1))[..., None]  # (b, h, n, 1)
    x = q
    for _ in range(steps):
        s = t * (np.einsum("bnhd,bmhd->bhnm", x, k) / np.sqrt(q.shape[-1]) + bias)
        s = np.where(mask, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = (1 - gamma) * x + gamma * alpha * np.einsum("bhnm,bmhd->bnhd", p, v)
    return x


@pytest.mark.parametrize("steps", [1, 2])
def test_chunked_attention_over_several_chunks_equals_numpy(steps, monkeypatch):
    # A budget of 70 query rows of logits splits n = 195 into three chunks of 65 (the
    # largest divisor that fits); temperature, bias and mask all vary along the queries,
    # so a chunk stitched back in the wrong place, or paired with another chunk's rows
    # of them, gives wrong rows.
    b, n, m, h, hk, d = 2, 195, 80, 4, 2, 8
    monkeypatch.setattr(attention_kernels, "CHUNK_BYTES", 70 * 4 * b * h * m)
    rng = np.random.default_rng(1)
    q, k, v = (
        jnp.asarray(rng.standard_normal(shape), jnp.float32)
        for shape in ((b, n, h, d), (b, m, hk, d), (b, m, hk, d))
    )
    bias = jnp.asarray(rng.standard_normal((b, h, n, m)), jnp.float32)
    mask = jnp.asarray(rng.random((b, 1, n, m)) < 0.7).at[..., 0].set(True)
    tau = jnp.asarray(rng.uniform(0.3, 1.5, (b, n, h)), jnp.float32)
    assert energy_module._chunk_size(q, k) == 65
    assert energy_module._pick_implementation(q, k, bias, mask, backend="cpu") == "chunked"
    e = Energy(tau=tau, alpha=0.9, gamma=0.7)
    ref = _numpy_energy_attention(q, k, v, tau, 0.9, 0.7, bias, mask, steps)
    for impl in ("chunked", None):  # None: the CPU default picks the chunks here
        out = energy_attention(q, k, v, e, bias=bias, mask=mask, steps=steps, implementation=impl)
        np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-4)


def _jaxpr(fn, *args) -> str:
    return str(jax.make_jaxpr(fn)(*args))


def test_benchmarked_feature_networks_are_the_loaders(tmp_path):
    """The features section times the evaluation's networks: on the same weights,
    ``inception.from_variables`` and ``dinov2.from_params`` trace the very program that
    ``load_inception`` and ``load_dinov2`` build (resize, dtype, precision, image size),
    in float32 and bfloat16, and the random weights come in the loaders' layout and shapes
    (DINOv2's position embeddings resampled from the training grid to the input's)."""
    images = jax.ShapeDtypeStruct((2, 20, 20, 3), jnp.uint8)
    variables = features.inception_variables()
    tensors = {}
    for c, leaves in variables.items():
        for path, x in traverse_util.flatten_dict(leaves).items():
            x = x.transpose(3, 2, 0, 1) if path[-1] == "kernel" else x  # torch's OIHW
            tensors[inception.torch_name("Inception3", c, path)] = np.ascontiguousarray(x)
    save_file(tensors, str(tmp_path / "inception.safetensors"))
    hf = tiny_dinov2_config()  # a 56 px training grid (4 x 4 patches)
    folder = write_dinov2_folder(tmp_path / "dinov2", hf, dinov2_state_dict(hf))
    config = dinov2.make_config(hf, "tiny")
    params = features.dinov2_params(config, image_size=28, train_size=56)
    for dtype in (jnp.float32, jnp.bfloat16):
        loaded = inception.load_inception(str(tmp_path / "inception.safetensors"), dtype=dtype)
        ours = inception.from_variables(variables, dtype=dtype)
        jax.tree.map(np.testing.assert_array_equal, loaded.params, variables)
        assert _jaxpr(ours.apply, variables, images) == _jaxpr(loaded.apply, variables, images)
        assert ours.settings.items() <= loaded.settings.items()

        loaded = dinov2.load_dinov2(folder, dtype=dtype, image_size=28)
        ours = dinov2.from_params(config, params, dtype=dtype, image_size=28)
        assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, loaded.params)
        assert _jaxpr(ours.apply, params, images) == _jaxpr(loaded.apply, params, images)
        assert ours.settings.items() <= loaded.settings.items()


def test_benchmarked_dinov2_have_the_published_shapes():
    """At their 518 px training grid the benchmark's ViT-S/14 and ViT-L/14 hold the
    parameters of the published facebook/dinov2-small and -large (22,056,576 and
    304,368,640 as transformers and torch hub count them) less the mask token (one
    hidden-size vector, used only in pre-training), in heads of 64 channels as theirs."""
    published = {"DINOv2 ViT-S/14": 22_056_576, "DINOv2 ViT-L/14": 304_368_640}
    pixels = jax.ShapeDtypeStruct((1, 518, 518, 3), jnp.float32)
    for name, c in features.DINOV2.items():
        abstract = jax.eval_shape(dinov2.Dinov2(c).init, jax.random.key(0), pixels)
        assert sum(x.size for x in jax.tree.leaves(abstract)) == published[name] - c.hidden_size
        assert (c.hidden_size // c.num_heads, c.patch_size) == (64, 14)
