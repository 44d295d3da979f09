"""Where the shipped weights live: models/ in a checkout, package data when installed.

The repository keeps its small demo models (demo-dit, demo-mmdit, classifier) in models/,
where training exports them. The wheel carries the same folder as the data-only package
``erg_jax_models`` (setup.py maps models/ onto it), so a pip-installed erg-jax (Colab)
finds the weights without a clone. Paths typed as ``models/...`` keep working in both.
"""

from __future__ import annotations

import importlib.util
import os

PACKAGE = "erg_jax_models"  # the installed name of the repository's models/ folder


def models_dir() -> str:
    """The folder holding demo-dit, demo-mmdit and classifier.

    The repository's models/ when erg_jax runs from a checkout (editable install
    included), else the installed package data.

    Raises:
      FileNotFoundError: neither a checkout nor an installed copy of the weights.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    checkout = os.path.join(root, "models")
    if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(checkout):
        return checkout
    spec = importlib.util.find_spec(PACKAGE)
    # A data-only package (no __init__.py): its folder is its search location.
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isdir(folder):
            return folder
    raise FileNotFoundError(
        f"the shipped models are neither in a checkout ({checkout}) nor installed as "
        f"the package {PACKAGE!r}: install erg-jax from its repository or a wheel"
    )


def resolve(path: str) -> str:
    """``path`` as typed, or the shipped copy of ``models/...`` where it is not on disk.

    An existing path is returned unchanged, so a checkout's models/ (and any user folder)
    wins; "models" or "models/NAME" that does not exist relative to the working directory
    is looked up in models_dir(). Any other path is returned unchanged.
    """
    if os.path.exists(path):
        return path
    head, _, rest = os.path.normpath(path).partition(os.sep)
    if head != "models":
        return path
    return os.path.join(models_dir(), rest) if rest else models_dir()
