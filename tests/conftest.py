"""Test setup: 8 fake CPU devices for the sharding tests, set before JAX starts."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One compilation cache for the session and the jobs it starts: a test that compiles a
# program another already compiled (the same tiny model and guider in several jobs, on
# either worker) loads it. A new folder each session, so nothing carries over.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="erg_jax_tests_xla_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

# The jobs the tests start (launch.sample, launch.train, ... in a second Python) compile
# without XLA's CPU optimisation passes: their programs are small and compiled once, so
# compiling dominates them (2.3x less time on test_guidance.py when tried there). The
# test process itself keeps XLA's default compile: some tests hold two programs to bit
# equality (the weak-branch cache at k = 1, neutral controls), which the optimised
# compile gives and the unoptimised one need not. The flags reach only processes
# started after JAX has read its own (the first backend call, here).
import jax  # noqa: E402

UNOPTIMISED = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# pytest-xdist's workers inherit the flags the controlling process added: not for them
os.environ["XLA_FLAGS"] = " ".join(os.environ["XLA_FLAGS"].replace(UNOPTIMISED, "").split())
jax.devices()
os.environ["XLA_FLAGS"] += " " + UNOPTIMISED

# scripts/test.sh gives two workers whole files in collection order: the longest files
# go first, so that no worker is left running a long one after the other has finished.
LONGEST_FIRST = ("test_job.py", "test_readme.py", "test_shared_prefix.py", "test_benchmark.py")
LONGEST_FIRST += ("test_wan_pipeline.py", "test_dry_run.py", "test_notebook.py", "test_sag.py")
LONGEST_FIRST += ("test_evaluate.py", "test_mmdit.py", "test_models_e2e.py", "test_context_job.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))
