"""The sampling job end to end: device counts, batch sizes, preemption, config errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from erg_jax.jobs import output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int) -> dict:
    env = dict(os.environ)
    # the session's other XLA flags (conftest.py) kept, the device count replaced
    kept = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={devices}"] + kept)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT
    return env


def _cmd(config: str, workdir: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "launch.sample",
        f"--config={config}",
        f"--workdir={workdir}",
        "--config.output.progress=False",
        *overrides,
    ]


def _run(config, workdir, *overrides, devices=1):
    res = subprocess.run(
        _cmd(config, workdir, *overrides),
        cwd=ROOT,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _images(workdir: str, method: str) -> np.ndarray:
    done = sorted(output.done_indices(workdir, method))
    return np.stack([output.read_png(output.sample_path(workdir, method, i)) for i in done])


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/dit.py:tiny", "configs/sd3.py:tiny"])
def test_same_images_on_1_and_8_devices_and_any_batch(config, tmp_path):
    methods = "--config.guidance.methods=cfg,erg"
    a, b, c = (str(tmp_path / x) for x in "abc")
    _run(config, a, methods, "--config.sampler.batch_size=8", devices=1)
    # this process has 8 devices: the job on all of them, without starting another Python
    _sample(b, config, **{"guidance.methods": "cfg,erg", "sampler.batch_size": 8})
    _run(config, c, methods, "--config.sampler.batch_size=4", devices=1)
    for method in ("cfg", "erg"):
        ref = _images(a, method).astype(int)
        assert ref.shape[0] == 8
        for other in (b, c):
            assert np.max(np.abs(_images(other, method).astype(int) - ref)) <= 1
    assert np.mean(np.abs(_images(a, "cfg").astype(int) - _images(a, "erg"))) > 1.0
    summary = json.load(open(os.path.join(b, "summary.json")))
    assert summary["device_count"] == 8 and summary["mesh"]["data"] == 8
    assert os.path.exists(os.path.join(a, "erg_grid.png"))
    manifest = json.load(open(os.path.join(a, "manifest.json")))
    assert manifest["samples"] == {"cfg": 8, "erg": 8}


@pytest.mark.slow
def test_two_processes_write_their_own_samples_of_the_same_images(tmp_path):
    """Two hosts of 4 devices each (jax.distributed over CPU, gloo collectives), each
    writing to its own disk: together exactly the one-process job's files, none twice."""
    import socket

    cfg, args = "configs/dit.py:tiny", ("--config.guidance.methods=cfg,erg",)
    one = str(tmp_path / "one")  # one process of 8 devices: this one
    _sample(one, cfg, **{"guidance.methods": "cfg,erg", "output.num_samples": 16})
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    hosts = [str(tmp_path / f"host{i}") for i in range(2)]
    procs = [
        subprocess.Popen(
            _cmd(cfg, hosts[i], *args, "--config.output.num_samples=16")
            + [f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
            cwd=ROOT,
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    for method in ("cfg", "erg"):
        mine = [output.done_indices(h, method) for h in hosts]
        assert not mine[0] & mine[1] and mine[0] | mine[1] == set(range(16))
        assert len(mine[0]) == len(mine[1]) == 8  # each host its half of every batch
        for h, idx in zip(hosts, mine, strict=True):
            for i in idx:
                a = output.read_png(output.sample_path(h, method, i)).astype(int)
                b = output.read_png(output.sample_path(one, method, i)).astype(int)
                assert np.max(np.abs(a - b)) <= 1, (method, i)
    summary = json.load(open(os.path.join(hosts[0], "summary.json")))
    assert summary["process_count"] == 2 and summary["device_count"] == 8
    assert not os.path.exists(os.path.join(hosts[1], "summary.json"))  # process 0 writes it


def _wait_for_png(workdir, method, proc, timeout=300):
    start = time.time()
    while time.time() - start < timeout:
        if output.done_indices(workdir, method):
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read()[-3000:])
        time.sleep(0.05)
    raise AssertionError("no image written in time")


@pytest.mark.slow
def test_killed_and_restarted_job_equals_an_uninterrupted_one(tmp_path):
    cfg = "configs/dit.py:tiny"
    args = (
        "--config.guidance.methods=cfg,erg",
        "--config.output.num_samples=24",
        "--config.sampler.batch_size=4",
    )
    full, killed, termed = (str(tmp_path / x) for x in ("full", "killed", "termed"))
    _run(cfg, full, *args)

    proc = subprocess.Popen(
        _cmd(cfg, killed, *args),
        cwd=ROOT,
        env=_env(1),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_png(killed, "cfg", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(output.done_indices(killed, "erg")) < 24
    _run(cfg, killed, *args)
    for method in ("cfg", "erg"):
        names = sorted(os.listdir(os.path.join(full, method)))
        assert names == sorted(os.listdir(os.path.join(killed, method)))
        assert len(names) == 24 + 1  # and samples.jsonl, compared too
        for name in names:
            with (
                open(os.path.join(full, method, name), "rb") as f1,
                open(os.path.join(killed, method, name), "rb") as f2,
            ):
                assert f1.read() == f2.read(), name

    proc = subprocess.Popen(
        _cmd(cfg, termed, *args),
        cwd=ROOT,
        env=_env(1),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_png(termed, "cfg", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    summary = json.load(open(os.path.join(termed, "summary.json")))
    assert summary["stopped_by_signal"]
    done = output.done_indices(termed, "cfg")
    assert 0 < len(done) < 24 and len(done) % 4 == 0  # whole batches only
    extra = [n for n in os.listdir(os.path.join(termed, "cfg")) if not n.endswith(".png")]
    assert extra == ["samples.jsonl"]  # no temporary file; the metadata of what is there
    assert [line["index"] for line in output.read_metadata(termed, "cfg")] == sorted(done)
    for i in done:
        output.read_png(output.sample_path(termed, "cfg", i))  # every file is whole
    # The finished job's metadata: a line per image, its class, seed and settings.
    lines = output.read_metadata(full, "erg")
    assert [line["index"] for line in lines] == list(range(24))
    labels = [int(line["condition"].split()[-1]) for line in lines]
    k = max(labels) + 1  # "all" classes in turn
    assert k > 1 and labels == [i % k for i in range(24)]
    assert all(line["seed"] == 0 for line in lines)
    assert {line["guidance"]["methods"] for line in lines} == {"cfg,erg"}
    assert os.path.exists(os.path.join(full, "index.html"))


# ---- in-process: config checks, sharding, overrides ---------------------------------


def _tiny(spec="configs/dit.py:tiny", **changes):
    import importlib

    module, _, variant = spec.partition(":")
    c = importlib.import_module(module[:-3].replace("/", ".")).get_config(variant)
    c.output.progress = False
    for path, value in changes.items():
        node = c
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _sample(workdir, spec="configs/dit.py:tiny", **changes):
    """The job of a config file (as launch.sample's --config) in this process."""
    from erg_jax.jobs.job import run_sampling

    return run_sampling(_tiny(spec, **changes), str(workdir))


def test_fsdp_sharded_params_give_the_same_images(tmp_path):
    _sample(tmp_path / "rep", **{"guidance.methods": "erg", "output.num_samples": 8})
    _sample(
        tmp_path / "fsdp",
        **{"guidance.methods": "erg", "output.num_samples": 8, "mesh.data": 2, "mesh.fsdp": 4},
    )
    a = _images(str(tmp_path / "rep"), "erg").astype(int)
    b = _images(str(tmp_path / "fsdp"), "erg").astype(int)
    assert np.max(np.abs(a - b)) <= 1


def test_a_multi_slice_mesh_and_custom_axis_rules_give_the_same_images(tmp_path):
    base = {"guidance.methods": "cfg", "output.num_samples": 8}
    _sample(tmp_path / "rep", **base)
    hybrid = {"mesh.data": -1, "mesh.fsdp": 2, "mesh.dcn_data": 2}
    s = _sample(tmp_path / "dcn", **base, **hybrid, **{"logical_axis_rules": "embed=,mlp=fsdp"})
    assert s["mesh"] == {"data": 4, "fsdp": 2, "context": 1, "tensor": 1}
    a = _images(str(tmp_path / "rep"), "cfg").astype(int)
    b = _images(str(tmp_path / "dcn"), "cfg").astype(int)
    assert np.max(np.abs(a - b)) <= 1


def test_a_restarted_job_loads_its_programs_from_the_compile_cache(tmp_path):
    cache = str(tmp_path / "cache")
    args = ("--config.guidance.methods=cfg", "--config.output.num_samples=4")
    args += ("--config.sampler.batch_size=4", f"--config.compile_cache_dir={cache}")
    summaries = []
    for name in ("first", "second"):  # two workdirs: the second samples everything again
        _run("configs/dit.py:tiny", str(tmp_path / name), *args)
        summaries.append(json.load(open(tmp_path / name / "summary.json")))
    first, second = (s["compile_cache"] for s in summaries)
    assert first["misses"] > 0 and os.listdir(cache)
    # every program of the rerun comes from the folder (the first run already hits
    # where it compiles one program twice, as separate jit objects)
    assert second["misses"] == 0, (first, second)
    assert second["hits"] == first["hits"] + first["misses"], (first, second)
    seconds = [s["methods"]["cfg"]["compile_seconds"] for s in summaries]
    assert seconds[1] < seconds[0], seconds


def test_overrides_reach_the_sampler_and_a_sweep_compiles_once(tmp_path):
    base = {"guidance.methods": "erg", "output.num_samples": 8}
    _sample(tmp_path / "base", **base)
    ref = _images(str(tmp_path / "base"), "erg").astype(int)
    for field, value in (
        ("guidance.scale", 8.0),
        ("guidance.erg.tau", 0.1),
        ("guidance.erg.kappa", 0.9),
    ):
        _sample(tmp_path / field, **base, **{field: value})
        changed = np.abs(_images(str(tmp_path / field), "erg").astype(int) - ref) > 1
        # the same job on the same devices is bit-exact, so any change is the override's
        assert np.mean(changed) > 0.005, field
    summary = _sample(
        tmp_path / "sweep",
        **{"guidance.methods": "erg", "output.num_samples": 8, "guidance.sweep": "scale=1.5,3,4.5"},
    )
    assert summary["compiles"] == 1
    assert set(summary["methods"]) == {"erg_scale1.5", "erg_scale3", "erg_scale4.5"}
    same = _images(str(tmp_path / "sweep"), "erg_scale3").astype(int)
    assert np.max(np.abs(same - ref)) <= 1  # the tiny config's scale is 3


def test_a_sweep_over_the_weak_branch_cache_compiles_once(tmp_path):
    base = {"guidance.methods": "cfg", "output.num_samples": 8}
    _sample(tmp_path / "plain", **base)
    cached = {"guidance.methods": "cfg+cache", "guidance.sweep": "cache.every=1,3"}
    s = _sample(tmp_path / "sweep", **dict(base, **cached))
    assert s["compiles"] == 1
    plain = _images(str(tmp_path / "plain"), "cfg").astype(int)
    every1 = _images(str(tmp_path / "sweep"), "cfg+cache_every1").astype(int)
    every3 = _images(str(tmp_path / "sweep"), "cfg+cache_every3").astype(int)
    assert np.max(np.abs(every1 - plain)) <= 1  # every step: the uncached sampler
    assert np.mean(np.abs(every3 - plain) > 1) > 0.005


def test_a_restart_removes_its_own_unfinished_files_and_no_other_hosts(tmp_path):
    _sample(tmp_path, **{"guidance.methods": "cfg", "output.num_samples": 4})
    folder = os.path.join(tmp_path, "cfg")
    # what a kill between write and rename leaves: ours (process 0) and another host's
    ours = output._tmp_path(output.sample_path(str(tmp_path), "cfg", 5))
    other = os.path.join(folder, ".00000006.png.partial-p1-123")
    for name in (ours, other):
        with open(name, "wb") as f:
            f.write(b"half a png")
    s = _sample(tmp_path, **{"guidance.methods": "cfg", "output.num_samples": 8})
    assert s["methods"]["cfg"]["written_now"] == 4
    assert not os.path.exists(ours)
    assert os.path.exists(other)  # process 1 cleans up its own
    assert output.done_indices(str(tmp_path), "cfg") == set(range(8))


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    target = str(tmp_path / "x.png")
    with pytest.raises(TypeError):
        output.atomic_write_bytes(target, object())  # not bytes: f.write fails mid-way
    assert os.listdir(tmp_path) == []


def test_a_stored_checkpoint_samples_the_same_scanned_or_not(tmp_path):
    import jax

    from erg_jax import checkpoint
    from erg_jax.models import dit

    config = dit.dit_config(_tiny().model.preset)
    params = dit.init_params(config, jax.random.key(3))
    checkpoint.save(str(tmp_path / "ckpt"), params, config)
    base = {
        "model.random_init": False,
        "model.checkpoint": str(tmp_path / "ckpt"),
        "guidance.methods": "erg",
        "output.num_samples": 8,
    }
    _sample(tmp_path / "flat", **base)
    # the block layout is not part of the fingerprint: the same workdir takes both
    _sample(tmp_path / "flat", **{**base, "model.scan_blocks": True, "output.num_samples": 12})
    _sample(tmp_path / "scan", **base, **{"model.scan_blocks": True})
    a = _images(str(tmp_path / "flat"), "erg").astype(int)
    b = _images(str(tmp_path / "scan"), "erg").astype(int)
    assert len(a) == 12
    assert np.max(np.abs(a[:8] - b)) <= 1


def test_more_samples_extend_and_a_changed_config_is_refused(tmp_path):
    _sample(tmp_path, **{"guidance.methods": "cfg", "output.num_samples": 4})
    s = _sample(tmp_path, **{"guidance.methods": "cfg", "output.num_samples": 8})
    assert s["methods"]["cfg"]["written_now"] == 4
    assert len(output.done_indices(str(tmp_path), "cfg")) == 8
    with pytest.raises(ValueError, match="guidance.scale"):
        _sample(tmp_path, **{"guidance.methods": "cfg", "guidance.scale": 7.0})


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"guidance.methods": "cfg,fancy"}, "guidance.methods"),
        ({"model.random_init": False, "model.checkpoint": "/nonexistent"}, "model.checkpoint"),
        ({"vae.random_init": False, "vae.checkpoint": ""}, "vae.checkpoint"),
        ({"sampler.batch_size": 3}, "sampler.batch_size"),
        ({"guidance.erg.kappa": 2.0}, "erg kappa"),
        ({"sampler.solver": "rk45"}, "solver"),
        ({"conditioning.classes": "3,99"}, "conditioning.classes"),
        ({"model.attention_implementation": "flash"}, "model.attention_implementation"),
        ({"logical_axis_rules": "embd=fsdp"}, "logical_axis_rules"),
        ({"logical_axis_rules": "embed=pipeline"}, "logical_axis_rules"),
        ({"mesh.dcn_data": 3}, "3 slices"),
    ],
)
def test_bad_configs_fail_before_compiling(tmp_path, changes, field, monkeypatch):
    from erg_jax import pipeline

    def compiling(*a, **k):
        raise AssertionError("the job reached compilation")

    monkeypatch.setattr(pipeline, "generate_fn", compiling)
    with pytest.raises(ValueError, match=field):
        _sample(tmp_path, **changes)
    assert not output.done_indices(str(tmp_path), "cfg")


def test_unknown_config_field_is_refused_by_the_entry_point(tmp_path):
    res = subprocess.run(
        _cmd("configs/dit.py:tiny", str(tmp_path), "--config.guidance.scal=3"),
        cwd=ROOT,
        env=_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0
    assert "scal" in res.stderr


def test_a_sweep_over_tau_c_encodes_each_temperature_and_compiles_once(tmp_path):
    """C-ERG alone at two text-encoder temperatures: two tempered encodings, two sets of
    images, one program (the tempered condition is data)."""
    from configs import sd3
    from erg_jax.jobs.job import run_sampling

    c = sd3.get_config("tiny")
    c.output.progress, c.output.num_samples = False, 8
    c.guidance.methods, c.guidance.sweep = "erg", "erg.tau_c=0.5,2.0"
    c.guidance.erg.image_energy = False  # the weak branch differs by its condition alone
    summary = run_sampling(c, str(tmp_path))
    assert summary["compiles"] == 1
    assert set(summary["methods"]) == {"erg_tau_c0.5", "erg_tau_c2.0"}
    low = _images(str(tmp_path), "erg_tau_c0.5").astype(int)
    high = _images(str(tmp_path), "erg_tau_c2.0").astype(int)
    assert np.mean(np.abs(low - high) > 1) > 0.01
