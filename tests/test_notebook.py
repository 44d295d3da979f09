"""The Colab quickstart runs top to bottom on CPU: from the checkout, and as Colab runs it,
installed from a wheel into a fresh Python that already has jax, which it must leave alone."""

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

import pytest
from test_wheel import built_wheel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "erg_quickstart.ipynb")
EXPECTED = "compiled samplers (none, CFG, ERG): 3"  # 17 settings, 3 programs
# What a Colab runtime has before the notebook's first cell (besides jax).
COLAB_HAS = ("nbclient", "nbformat", "ipykernel", "matplotlib")

# Runs inside the fresh environment: the kernel is this interpreter's ipykernel, named by
# a kernelspec on JUPYTER_PATH so that no other Python's "python3" can stand in for it.
DRIVER = """
import json, os, sys
import nbclient, nbformat

src, dst, specs = sys.argv[1:]
os.makedirs(os.path.join(specs, "kernels", "python3"))
with open(os.path.join(specs, "kernels", "python3", "kernel.json"), "w") as f:
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    json.dump({"argv": argv, "display_name": "Python 3", "language": "python"}, f)
os.environ["JUPYTER_PATH"] = specs
nb = nbformat.read(src, as_version=4)
client = nbclient.NotebookClient(
    nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": os.getcwd()}}
)
try:
    client.execute()
finally:
    nbformat.write(nb, dst)
"""


def _outputs(nb) -> tuple[list, str]:
    """The error outputs of a run notebook, and all its text output."""
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(
        "".join(o["text"]) if isinstance(o.get("text"), list) else o.get("text", "")
        for o in outputs
    )
    return errors, text


@pytest.mark.slow
def test_quickstart_notebook_runs():
    nbformat = pytest.importorskip("nbformat", reason="needs the notebook extra")
    nbclient = pytest.importorskip("nbclient", reason="needs the notebook extra")
    if not os.path.isdir(os.path.join(ROOT, "models", "demo-mmdit")):
        pytest.skip("the shipped models (models/) are absent")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env_before = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "Agg"
    try:
        client = nbclient.NotebookClient(
            nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": ROOT}}
        )
        client.execute()
    finally:
        if env_before is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = env_before
    errors, text = _outputs(nb)
    assert not errors
    assert EXPECTED in text
    # erg-jax is installed here: the install cell leaves it, the weights are the checkout's.
    assert "weights: " + os.path.join(ROOT, "models") + "\n" in text


def test_models_paths_find_the_shipped_weights_from_anywhere(tmp_path, monkeypatch):
    """A typed models/ path: the folder on disk where there is one, else the shipped copy."""
    from erg_jax.shipped_models import models_dir, resolve

    assert models_dir() == os.path.join(ROOT, "models")  # a checkout uses its own folder
    monkeypatch.chdir(tmp_path)
    assert resolve("models") == os.path.join(ROOT, "models")
    assert resolve("models/classifier") == os.path.join(ROOT, "models", "classifier")
    assert resolve("ckpt/dit") == "ckpt/dit"  # other paths are the caller's business
    (tmp_path / "models" / "classifier").mkdir(parents=True)
    assert resolve("models/classifier") == "models/classifier"  # the user's own wins


def _run(cmd, timeout, **kwargs) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


JAX_VERSIONS = "import importlib.metadata as m; print(m.version('jax'), m.version('jaxlib'))"


@pytest.mark.slow
def test_quickstart_installs_into_a_colab_like_python(tmp_path):
    """The install cell puts erg-jax and its weights next to an existing jax, unchanged.

    A fresh virtual environment holds what Colab has before the first cell (this jax,
    nbclient, ipykernel, matplotlib); the notebook runs in it from the built wheel, in a
    working directory outside the repository.
    """
    from importlib.metadata import version

    if not os.path.isdir(os.path.join(ROOT, "models", "demo-mmdit")):
        pytest.skip("the shipped models (models/) are absent")
    start = time.time()
    pins = [f"jax=={version('jax')}", f"jaxlib=={version('jaxlib')}"]
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp_path / "probe")]
        + pins[:1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if probe.returncode:
        pytest.skip(f"pip cannot reach the package index: {probe.stderr.strip()[-300:]}")
    wheel = built_wheel()
    shipped = {
        os.path.relpath(os.path.join(folder, name), os.path.join(ROOT, "models"))
        for folder, _, names in os.walk(os.path.join(ROOT, "models"))
        for name in names
    }
    with zipfile.ZipFile(wheel) as z:
        packed = {n.removeprefix("erg_jax_models/") for n in z.namelist()}
    assert shipped <= packed, sorted(shipped - packed)  # every file of every model
    assert os.path.getsize(wheel) < 25e6
    venv = str(tmp_path / "venv")
    try:
        _install_and_run(venv, wheel, pins, tmp_path)
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # 1.3 GB; ran.ipynb stays for a look
    print(f"install-path notebook test: {time.time() - start:.0f} s")


def _install_and_run(venv: str, wheel: str, pins: list[str], tmp_path) -> None:
    _run([sys.executable, "-m", "venv", venv], 300)
    python = os.path.join(venv, "bin", "python")
    # (no byte-compiling of what pip installs: the test's time, not what it checks)
    _run([python, "-m", "pip", "install", "-q", "--no-compile", *pins, *COLAB_HAS], 1200)
    before = _run([python, "-c", JAX_VERSIONS], 60)

    # Nothing may resolve to the checkout: another working directory, no inherited paths.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(MPLBACKEND="Agg", PIP_COMPILE="0")  # pip: no byte-compiling
    env["PATH"] = os.path.dirname(python) + os.pathsep + env.get("PATH", "")
    work = tmp_path / "work"
    work.mkdir()

    # A source that wants another jax: the pinned install stops, loudly, and keeps jax.
    install_cell = "".join(json.load(open(NOTEBOOK))["cells"][1]["source"])
    assert "ERG_JAX_SOURCE" in install_cell
    other = dict(env, ERG_JAX_SOURCE=pins[0].replace("==", "<"))
    cell = [python, "-c", install_cell]
    r = subprocess.run(cell, cwd=work, env=other, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "RuntimeError: pip install" in r.stderr, r.stderr[-3000:]
    assert _run([python, "-c", JAX_VERSIONS], 60) == before

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    ran = str(tmp_path / "ran.ipynb")
    cmd = [python, str(driver), NOTEBOOK, ran, str(tmp_path / "jupyter")]
    env.update(ERG_JAX_SOURCE=wheel)
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=2400)
    nb = json.load(open(ran)) if os.path.exists(ran) else {"cells": []}
    errors, text = _outputs(nb)
    assert r.returncode == 0 and not errors, (r.stderr[-3000:], errors)
    assert EXPECTED in text
    assert "keeping: " + ", ".join(pins) + "\n" in text  # the pins found jax and jaxlib
    weights = os.path.join(venv, "lib")  # the package's copy, not the checkout's models/
    assert f"weights: {weights}" in text and "/erg_jax_models\n" in text, text[:2000]
    assert _run([python, "-c", JAX_VERSIONS], 60) == before
