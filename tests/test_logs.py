"""What a launcher prints (launch/logs.py): the job's progress and results; the
libraries' INFO lines (Orbax per checkpoint, JAX's backend probing, transformers' advice
without torch) only with --verbose."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO = re.compile(r"^I\d{4} ", re.M)  # absl's prefix of an INFO line: I<month><day>
NO_TORCH = "PyTorch was not found"


def _demo(workdir, *flags: str) -> str:
    """stdout and stderr of the demo's runlocal variant, torch unimportable as in the
    demo's own setup (scripts/setup.sh demo), where transformers says so on import."""
    block = (
        "import sys, runpy; sys.modules['torch'] = None; "
        "sys.argv = ['quickstart', '--config=configs/quickstart.py:runlocal', "
        f"'--workdir={workdir}'"
        + "".join(f", {f!r}" for f in flags)
        + "]; runpy.run_module('launch.quickstart', run_name='__main__', alter_sys=True)"
    )
    res = subprocess.run(
        [sys.executable, "-c", block], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout + res.stderr


@pytest.mark.slow
def test_verbose_brings_back_the_libraries_info(tmp_path):
    """The quiet default is checked on the quickstart's own run (tests/test_quality.py,
    the README's main job): without --verbose no INFO line and no torch advice."""
    verbose = _demo(tmp_path / "verbose", "--verbose")
    assert "| method |" in verbose  # the results are shown too
    assert INFO.search(verbose)  # Orbax's, restoring the demo's checkpoints, among them
    assert NO_TORCH in verbose
