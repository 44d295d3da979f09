"""Reference modules the metric tests compare with, loaded file by file.

torch-fidelity's and clean-fid's package ``__init__`` import torchvision (whose wheels on
the package index are CUDA builds that do not import beside the CPU torch), so
scripts/setup.sh unpacks their wheels under .venv/references/ without installing them,
and ``module("torch_fidelity", "feature_extractor_inceptionv3")`` imports one file with
its package registered as an empty namespace: the package's own modules import each
other by their real names, and its ``__init__`` never runs.
"""

import importlib
import importlib.machinery
import os
import sys
import types

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv")
FOLDERS = {"torch_fidelity": "torch-fidelity", "cleanfid": "clean-fid"}


def _unused(package: str, name: str) -> types.ModuleType:
    """A stand-in for a module the reference imports names from but the test never calls
    (torch-fidelity's utils imports torchvision): any name it is asked for raises when
    called."""
    stub = types.ModuleType(f"{package}.{name}")

    def lookup(attr):
        def unused(*args, **kwargs):
            raise AssertionError(f"{package}.{name}.{attr} is stubbed out in the tests")

        return unused

    stub.__getattr__ = lookup
    return stub


def module(package: str, name: str, unused: tuple[str, ...] = ()):
    """The reference module ``package.name``, or a skip when it is not unpacked; the
    package's modules named in ``unused`` are replaced by stand-ins that raise if used."""
    pytest.importorskip("torch", reason="the reference implementations are PyTorch")
    folder = os.path.join(ROOT, "references", FOLDERS[package], package)
    if not os.path.isdir(folder):
        pytest.skip(f"{folder} is missing; bash scripts/setup.sh unpacks it")
    if package not in sys.modules:
        namespace = types.ModuleType(package)
        namespace.__path__ = [folder]
        # a spec, so that importlib.util.find_spec (torchmetrics' check) sees the package
        namespace.__spec__ = importlib.machinery.ModuleSpec(package, None, is_package=True)
        namespace.__spec__.submodule_search_locations = [folder]
        sys.modules[package] = namespace
    for other in unused:
        sys.modules.setdefault(f"{package}.{other}", _unused(package, other))
    return importlib.import_module(f"{package}.{name}")
