"""What the launchers log: the job's progress and results, not the libraries' INFO lines.

absl's ``app.run`` sets Python logging to INFO, which shows every INFO line of the
libraries: some 25 of Orbax per checkpoint restored, JAX's backend probing, and, where
torch is not installed (the demo's setup), transformers' advice that PyTorch was not found.
``set_up`` keeps the libraries at WARNING and erg_jax's own loggers (compile times,
conversions) at INFO; ``--verbose`` brings the libraries' INFO lines back, and an explicit
``--verbosity`` is left as given.
"""

from __future__ import annotations

import logging
import os

from absl import flags

VERBOSE = flags.DEFINE_bool(
    "verbose", False, "also show the libraries' INFO logs (Orbax, JAX, transformers)"
)


def set_up(verbose: bool | None = None) -> None:
    """Sets the log levels of a launcher, after absl has parsed its flags.

    Args:
      verbose: the libraries' INFO logs too (None: the --verbose flag).
    """
    verbose = VERBOSE.value if verbose is None else verbose
    # transformers reads these when first imported, which no launcher does before main
    if verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info")
        return  # absl has set Python logging to INFO or to --verbosity
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not flags.FLAGS["verbosity"].present:
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("erg_jax").setLevel(logging.INFO)
