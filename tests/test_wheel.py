"""The wheel puts only erg-jax's own names into site-packages, and runs from there.

A checkout runs ``python -m launch.sample --config=configs/...``; installed, launch/ and
configs/ are ``erg_jax_launch`` and ``erg_jax_configs`` (setup.py), never the generic
``launch`` and ``configs`` another package may also install, and each launcher is a
command ``erg-jax-NAME`` that finds the installed configs. The installed test runs in a
fresh virtual environment outside the repository whose dependencies are this Python's
(its site-packages added by a .pth, so the checkout's editable install does not come
along): nothing there can resolve to the checkout.
"""

import atexit
import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN = {"erg_jax", "erg_jax_launch", "erg_jax_configs", "erg_jax_models"}
SHIPPED = {"erg_jax_launch": "launch", "erg_jax_configs": "configs"}  # installed: checkout


def _run(cmd, timeout, **kwargs) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def build_wheel(tmp: str) -> str:
    """erg-jax's wheel, built from a copy of the sources (no build/ left in the checkout)
    with this Python's setuptools (no download)."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the wheel without build isolation needs setuptools")
    src = os.path.join(tmp, "src")
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("erg_jax", "launch", "configs", "models"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(src, name), ignore=skip)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src)
    out = os.path.join(tmp, "dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    _run(cmd + [src, "-w", out], 600)
    (wheel,) = os.listdir(out)
    return os.path.join(out, wheel)


@functools.cache
def built_wheel() -> str:
    """One wheel per test session (tests/test_notebook.py installs it too)."""
    tmp = tempfile.mkdtemp(prefix="erg-jax-wheel-")
    atexit.register(shutil.rmtree, tmp, True)
    return build_wheel(tmp)


def _launchers() -> set[str]:
    """The modules of launch/ that are programs (app.run), not helpers such as logs.py."""
    return {
        os.path.basename(p)[:-3]
        for p in glob.glob(os.path.join(ROOT, "launch", "*.py"))
        if "app.run(" in open(p).read()
    }


def test_the_wheel_holds_only_erg_jax_names():
    with zipfile.ZipFile(built_wheel()) as z:
        names = z.namelist()
        (info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        top_level = z.read(f"{info}/top_level.txt").decode().split()
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    tops = {n.split("/")[0] for n in names} - {info}
    assert tops == OWN, tops
    assert set(top_level) <= OWN, top_level
    # Every launcher and config of the checkout ships, under its installed name.
    for installed, folder in SHIPPED.items():
        have = {n.split("/", 1)[1] for n in names if n.startswith(installed + "/")}
        want = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, folder, "*.py"))}
        assert want <= have, (installed, sorted(want - have))
    # ... and each launcher is a command.
    scripts = {
        line.split("=")[0].strip(): line.split("=")[1].strip()
        for line in entry_points.splitlines()
        if "=" in line
    }
    assert scripts == {f"erg-jax-{n}": f"erg_jax_launch:{n}_command" for n in _launchers()}, scripts
    import launch

    assert all(callable(getattr(launch, f"{n}_command", None)) for n in _launchers())


def test_config_paths_resolve_to_the_installed_copy_only_where_absent(tmp_path, monkeypatch):
    """configs/NAME.py as typed where it is on disk (a checkout, a user's file), else the
    installed copy; other paths as typed."""
    import launch

    name = "erg_jax_configs_under_test"  # a stand-in installed copy, seen by no other finder
    installed = tmp_path / "site" / name
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(launch, "CONFIGS", name)
    monkeypatch.chdir(ROOT)
    assert launch.resolve_config("configs/dit.py:tiny") == "configs/dit.py:tiny"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert launch.resolve_config("configs/dit.py:tiny") == f"{installed}/dit.py:tiny"
    assert launch.resolve_config("configs/toy.py") == f"{installed}/toy.py"
    assert launch.resolve_config("mine/dit.py:tiny") == "mine/dit.py:tiny"
    (work / "configs").mkdir()
    (work / "configs" / "toy.py").write_text("")
    assert launch.resolve_config("configs/toy.py") == "configs/toy.py"  # the user's own


def _venv(tmp_path, wheel: str) -> tuple[str, dict]:
    """A fresh environment holding the wheel, its dependencies this Python's."""
    venv = str(tmp_path / "venv")
    _run([sys.executable, "-m", "venv", "--without-pip", venv], 300)
    python = os.path.join(venv, "bin", "python")
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps"]
    _run(pip + ["--no-index", wheel], 600)
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 60)
    deps = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    with open(os.path.join(site.strip(), "_erg_jax_test_deps.pth"), "w") as f:
        f.write("\n".join(sorted(deps)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(JAX_PLATFORMS="cpu", PATH=os.path.join(venv, "bin") + os.pathsep + env["PATH"])
    return venv, env


# Run in the fresh environment: where each name resolves (None: not importable).
WHERE = """
import importlib.util as u
for name in ("erg_jax", "erg_jax_launch", "erg_jax_configs", "launch", "configs"):
    spec = u.find_spec(name)
    print(name, spec.origin if spec else None)
"""


def _readme_library_code() -> str:
    """The python blocks of the README's "Using the library" section, as written."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Using the library", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "the README's library section has no python block"
    return "\n".join(blocks)


@pytest.mark.slow
def test_the_installed_commands_run_outside_the_checkout(tmp_path):
    if not os.path.isdir(os.path.join(ROOT, "models", "demo-dit")):
        pytest.skip("the shipped models (models/) are absent")
    venv, env = _venv(tmp_path, built_wheel())
    work = tmp_path / "work"  # no configs/ or models/ here: the installed copies serve
    work.mkdir()
    run = functools.partial(_run, cwd=work, env=env)
    python = os.path.join(venv, "bin", "python")
    where = dict(line.split(" ", 1) for line in run([python, "-c", WHERE], 120).splitlines())
    assert where["launch"] == where["configs"] == "None", where
    for name in OWN - {"erg_jax_models"}:
        assert where[name].startswith(venv), where

    # The launcher's default config (configs/quickstart.py) is found: absl's --help exits 1
    # after the override has been applied to it; an unfound default fails before.
    quickstart = os.path.join(venv, "bin", "erg-jax-quickstart")
    r = subprocess.run(
        [quickstart, "--config.seed=1", "--help"], cwd=work, env=env, capture_output=True, text=True
    )
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "erg_jax_launch/quickstart.py:" in r.stdout and "--workdir" in r.stdout, r.stdout

    # A given configs/ path names the installed file: the exact toy job, end to end.
    out = tmp_path / "toy"
    run([quickstart, "--config=configs/toy.py:runlocal", f"--workdir={out}"], 600)
    assert (out / "grid.png").is_file() and (out / "metrics.json").is_file()

    # The README's library examples as written: "models/demo-mmdit" is the shipped copy
    # (no models/ lies here), and the Pipeline finds its job config under the installed
    # name (a config that builds on configs/common.py).
    out = run([python, "-c", _readme_library_code()], 900)
    assert "(2, 32, 32, 3)" in out, out
