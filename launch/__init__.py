"""The entry points: one absl program per job, ``python -m launch.NAME`` in a checkout.

An installed wheel holds this folder as ``erg_jax_launch`` and configs/ as
``erg_jax_configs`` (setup.py: no generic top-level names in site-packages), and each
program is also a command, ``erg-jax-NAME`` (erg-jax-sample, erg-jax-quickstart, ...), with the
same flags. There a ``--config=configs/NAME.py[:variant]`` that does not exist relative to
the working directory names the installed copy, as ``models/...`` names the shipped
weights (erg_jax.shipped_models), so the README's commands run with ``python -m launch.``
replaced by ``erg-jax-``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import runpy

CONFIGS = "erg_jax_configs"  # the installed name of the repository's configs/ folder


def resolve_config(value: str) -> str:
    """A --config value as given, or configs/NAME.py[:variant] in the installed copy.

    An existing path is returned unchanged (a checkout's configs/ and any user file win);
    so is any path outside configs/, or everything when erg_jax_configs is not installed.
    """
    path, colon, variant = value.partition(":")
    head, _, rest = os.path.normpath(path).partition(os.sep)
    if os.path.exists(path) or head != "configs" or not rest:
        return value
    spec = importlib.util.find_spec(CONFIGS)
    if spec is None or not spec.origin:
        return value
    return os.path.join(os.path.dirname(spec.origin), rest) + colon + variant


def run_launcher(name: str) -> None:
    """Runs launcher ``name`` as ``python -m`` would, with installed config paths.

    ml_collections reads a config file flag's path (given or the launcher's default)
    relative to the working directory; its parser is wrapped, in this process only (an
    erg-jax command), to resolve_config() the path first.
    """
    from ml_collections.config_flags import config_flags

    parse = config_flags.ConfigFileFlagParser.parse

    def parse_resolved(self, path):
        return parse(self, resolve_config(path) if isinstance(path, str) else path)

    config_flags.ConfigFileFlagParser.parse = parse_resolved
    runpy.run_module(f"{__name__}.{name}", run_name="__main__", alter_sys=True)


# The console scripts of setup.py (erg-jax-NAME): NAME_command, a name apart from the
# launcher's own module (importing launch.NAME would otherwise replace the function).
sample_command = functools.partial(run_launcher, "sample")
quickstart_command = functools.partial(run_launcher, "quickstart")
train_command = functools.partial(run_launcher, "train")
convert_command = functools.partial(run_launcher, "convert")
quality_command = functools.partial(run_launcher, "quality")
entropy_command = functools.partial(run_launcher, "entropy")
report_command = functools.partial(run_launcher, "report")
benchmark_command = functools.partial(run_launcher, "benchmark")
evaluate_command = functools.partial(run_launcher, "evaluate")
