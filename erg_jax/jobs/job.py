"""The sampling job: N samples per guidance method, over any mesh, surviving preemption.

``run_sampling(config, workdir)`` is what ``python -m launch.sample`` calls. It checks
the whole config before anything compiles, builds the mesh, loads the denoiser, VAE and
text encoders (parameters restored straight into their shardings), then for each method
compiles one program (noise -> guided scan -> VAE decode) and runs it batch by batch.

Sample i uses key fold_in(seed, i) and condition i, so its image does not depend on the
devices, hosts or batch size. Each finished batch is written atomically; on restart,
batches whose PNGs are all on disk are skipped, so a job killed at any moment and run
again ends with exactly the files of an uninterrupted run. SIGTERM finishes the batch in
flight and exits cleanly.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

from erg_jax import sharding
from erg_jax.jobs import compile_cache, output, report
from erg_jax.jobs.job_setup import Plan, build_plan

logger = logging.getLogger(__name__)


class _Stop:
    """SIGTERM latch: the batch in flight is finished, then the job exits."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            del frame
            logger.warning("signal %d: finishing the current batch, then stopping", signum)
            self.requested = True

        try:
            self._old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (e.g. a notebook worker)
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _owned_rows(spec, shape) -> list[int]:
    """Batch rows this process writes: each row belongs to the lowest-id device holding it,
    so with replicated or multi-host layouts every row is written exactly once."""
    owner = {}
    for dev, index in sorted(spec.devices_indices_map(shape).items(), key=lambda kv: kv[0].id):
        for r in range(*index[0].indices(shape[0])):
            owner.setdefault(r, dev)
    return sorted(r for r, dev in owner.items() if dev.process_index == jax.process_index())


def _local_rows(images: jax.Array, owned: list[int]) -> dict[int, np.ndarray]:
    """The owned rows of a batch-sharded array, read from this process's shards."""
    rows = {}
    for shard in images.addressable_shards:
        start = shard.index[0].start or 0
        data = None
        for r in range(start, start + shard.data.shape[0]):
            if r in owned and r not in rows:
                data = np.asarray(shard.data) if data is None else data
                rows[r] = data[r - start]
    return rows


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


class _Progress:
    def __init__(self, method: str, total: int, enabled: bool):
        self.method, self.total, self.enabled = method, total, enabled
        self.done, self.start = 0, time.perf_counter()

    def update(self, n: int):
        self.done += n
        if self.enabled:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            bar = "#" * int(30 * self.done / max(self.total, 1))
            sys.stderr.write(
                f"\r{self.method:>14} [{bar:<30}] {self.done}/{self.total} {rate:.2f} samples/s"
            )
            sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")


def run_sampling(config, workdir: str) -> dict:
    """Runs the sampling job of a config (see configs/dit.py, configs/sd3.py).

    Returns:
      The summary (also written to workdir/summary.json): devices, compile seconds and
      samples/s per method, seconds to the first written image.
    """
    t_start = time.perf_counter()
    cache_dir = str(config.get("compile_cache_dir", ""))
    if cache_dir:
        compile_cache.enable(os.path.abspath(cache_dir))
    with compile_cache.Counter() as compiles:
        summary = _run(config, workdir, t_start)
        if cache_dir:
            summary["compile_cache"] = {
                "dir": os.path.abspath(cache_dir),
                "hits": compiles.hits,
                "misses": compiles.misses,
            }
    if jax.process_index() == 0:
        output.atomic_write_json(os.path.join(workdir, "summary.json"), summary)
        if not summary["stopped_by_signal"]:
            report.job_report(workdir)  # index.html: the labelled grid, the table, settings
    return summary


def _run(config, workdir: str, t_start: float) -> dict:
    plan = build_plan(config, workdir)  # every check happens here, before compiling
    cfg = plan.config_dict
    os.makedirs(workdir, exist_ok=True)
    main = jax.process_index() == 0
    pipe = plan.pipeline
    n, batch = plan.num_samples, plan.batch_size
    summary: dict[str, Any] = {
        "config": cfg,
        "devices": [str(d) for d in jax.devices()],
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "mesh": {k: int(v) for k, v in pipe.mesh.shape.items()},
        "methods": {},
        "compiles": 0,
        "conversions": plan.conversions,
    }
    first_image = None
    stopped = False
    compiled_cache: dict = {}
    for folder in [workdir] + [os.path.join(workdir, m) for m in plan.methods]:
        if removed := output.remove_partial(folder):
            logger.info("removed %d unfinished file(s) of a killed run in %s", len(removed), folder)
    with _Stop() as stop:
        for method, guider in plan.methods.items():
            todo = sorted(set(range(n)) - output.done_indices(workdir, method))
            stats = {"samples": n, "written_now": 0, "compile_seconds": 0.0}
            if not todo and jax.process_count() == 1:
                summary["methods"][method] = stats
                continue
            leaves, treedef = jax.tree_util.tree_flatten(guider)
            structure = (treedef, tuple((np.shape(x), np.result_type(x)) for x in leaves))
            if structure not in compiled_cache:
                t0 = time.perf_counter()
                _, fn = pipe.program()
                example = pipe.batch_inputs(plan.seed, plan.conditions, np.arange(batch), guider)
                with sharding.mesh_context(pipe.mesh, pipe.rules):
                    compiled_cache[structure] = fn.lower(
                        pipe.params, pipe.vae_params, *example, guider
                    ).compile()
                stats["compile_seconds"] = time.perf_counter() - t0
                summary["compiles"] += 1
                logger.info("%s: compiled in %.1fs", method, stats["compile_seconds"])
            compiled = compiled_cache[structure]
            progress = _Progress(method, len(todo), main and plan.progress)
            run_seconds = 0.0
            shape = (batch,) + pipe.latent_shape
            owned = _owned_rows(pipe.batch_spec(shape), shape)
            for start in range(0, n, batch):
                done = output.done_indices(workdir, method)
                missing = [start + r for r in owned if start + r < n and start + r not in done]
                if not _any_process(bool(missing)):
                    continue
                t0 = time.perf_counter()
                idx = np.arange(start, start + batch)
                noise, conds, keys = pipe.batch_inputs(plan.seed, plan.conditions, idx, guider)
                images = compiled(pipe.params, pipe.vae_params, noise, conds, keys, guider)
                rows = _local_rows(images, owned)
                wanted = set(missing)  # finished samples of a partly done batch stay as they are
                keep = [i for i in sorted(rows) if start + i in wanted]
                output.write_samples(
                    workdir,
                    method,
                    [start + i for i in keep],
                    np.stack([rows[i] for i in keep]) if keep else np.zeros((0, 1, 1, 3)),
                    fps=int(cfg["video"]["fps"]),
                    crf=int(cfg["video"]["crf"]),
                )
                run_seconds += time.perf_counter() - t0
                stats["written_now"] += len(keep)
                if first_image is None and keep:
                    first_image = time.perf_counter() - t_start
                progress.update(len(missing))
                if main:
                    _manifest(workdir, cfg, plan)
                if _any_process(stop.requested):
                    stopped = True
                    break
            progress.close()
            if stats["written_now"]:
                stats["samples_per_second"] = stats["written_now"] / max(run_seconds, 1e-9)
            summary["methods"][method] = stats
            if stopped:
                break
    if jax.process_count() > 1:  # every process's last files are written before the grid
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("erg_jax.jobs.job: samples written")
    summary["seconds_to_first_image"] = first_image
    summary["stopped_by_signal"] = stopped
    summary["seconds"] = time.perf_counter() - t_start
    if main:
        _manifest(workdir, cfg, plan)
        for method in plan.methods:
            _metadata(workdir, method, plan)
        if not stopped:
            for method in plan.methods:
                _grid(workdir, method, plan)
    return summary


def _metadata(workdir: str, method: str, plan: Plan) -> None:
    """samples.jsonl: per written image its index, condition, seed and settings."""
    cfg = plan.config_dict
    model = {k: cfg["model"].get(k) for k in ("kind", "preset", "pretrained", "checkpoint")}
    lines = [
        {
            "index": i,
            "method": method,
            "file": os.path.basename(output.sample_file(workdir, method, i)),
            "condition": plan.conditions.describe(i),
            "seed": plan.seed,
            "noise": f"fold_in(key({plan.seed}), {i})",
            "guidance": cfg["guidance"],
            "sampler": cfg["sampler"],
            "model": model,
        }
        for i in sorted(output.done_indices(workdir, method))
    ]
    output.write_metadata(workdir, method, lines)


def _manifest(workdir: str, cfg: dict, plan: Plan) -> None:
    counts = {m: len(output.done_indices(workdir, m)) for m in plan.methods}
    output.write_manifest(workdir, cfg, counts)


def _grid(workdir: str, method: str, plan: Plan) -> None:
    done = sorted(output.done_indices(workdir, method))[: plan.grid_size]
    if not done:
        return
    imgs = np.stack([output.still(output.read_sample(workdir, method, i)) for i in done])
    output.write_grid(
        os.path.join(workdir, f"{method}_grid.png"), imgs.astype(np.float32) / 127.5 - 1.0
    )


def generate(plan: Plan, method: str, indices) -> np.ndarray:
    """Images of the given global sample indices for one method, as the job draws them,
    without writing files: (len(indices), H, W, 3) float32 in [-1, 1]."""
    if method not in plan.methods:
        raise ValueError(f"method must be one of {sorted(plan.methods)}, got {method!r}")
    return plan.pipeline.generate(plan.methods[method], plan.conditions, indices, seed=plan.seed)


def load_summary(workdir: str) -> dict:
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)
