"""launch/tpu_pod.sh with a stand-in gcloud that logs its calls: one slice or several."""

import os
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu_pod.sh")


def _pod(tmp_path, *args, slices=None, fail_node=None):
    log = tmp_path / "calls.log"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir(exist_ok=True)
    failing = f'[[ "$*" == *" {fail_node} "* ]] && exit 3' if fail_node else ""
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> {log}\n{failing}\nexit 0\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}")
    if slices is not None:
        env["SLICES"] = str(slices)
    res = subprocess.run(
        ["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return res, sorted(calls)


def test_one_slice_runs_the_quoted_command_on_every_worker(tmp_path):
    res, calls = _pod(tmp_path, "pod", "us-z1", "run", "python", "-m", "launch.sample", "a b")
    assert res.returncode == 0, res.stderr
    assert len(calls) == 1
    assert calls[0].startswith("compute tpus tpu-vm ssh pod --zone=us-z1 --worker=all")
    assert r"python -m launch.sample a\ b" in calls[0]


def test_several_slices_run_on_each_node_and_a_failure_is_reported(tmp_path):
    res, calls = _pod(tmp_path, "pod", "z", "run", "hostname", slices=3)
    assert res.returncode == 0, res.stderr
    nodes = [c.split()[4] for c in calls]
    assert nodes == ["pod-0", "pod-1", "pod-2"]
    assert all("--worker=all" in c for c in calls)
    res, _ = _pod(tmp_path, "pod", "z", "run", "hostname", slices=2, fail_node="pod-1")
    assert res.returncode == 3


@pytest.mark.parametrize("slices", ["0", "two"])
def test_a_bad_slice_count_is_refused(tmp_path, slices):
    res, calls = _pod(tmp_path, "pod", "z", "run", "ls", slices=slices)
    assert res.returncode == 2 and "SLICES" in res.stderr and not calls
