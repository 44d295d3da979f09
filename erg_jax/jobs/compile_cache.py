"""JAX's persistent compilation cache for jobs that restart.

A preempted pod job run again with the same command compiles the same programs; with
``compile_cache_dir`` set it loads them from there instead. ``enable`` points JAX at the
folder (every program is cached, however fast it compiled); ``Counter`` counts the cache
hits and misses of the compiles inside its block, from JAX's monitoring events.
"""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

HIT = "/jax/compilation_cache/cache_hits"
MISS = "/jax/compilation_cache/cache_misses"


def enable(directory: str) -> None:
    """Caches compiled programs in ``directory`` (created) from now on in this process.

    Programs are stored however short their compile was (JAX's default keeps only those
    over a second), so a restarted job finds every one of them.
    """
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if jax.config.jax_compilation_cache_dir != directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        compilation_cache.reset_cache()  # the next compile opens the new folder


class Counter:
    """``with Counter() as c: ...`` then ``c.hits``, ``c.misses`` of the compiles inside."""

    def __init__(self):
        self.hits = 0
        self.misses = 0

    def _event(self, event: str, **kwargs) -> None:
        del kwargs
        if event == HIT:
            self.hits += 1
        elif event == MISS:
            self.misses += 1

    def __enter__(self) -> Counter:
        jax.monitoring.register_event_listener(self._event)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_listener(self._event)
