"""Benchmarks: prints a table and writes JSON.

python -m launch.benchmark --only=attention --out=out/bench.json
python -m launch.benchmark --only=attention --lengths=256,1024 --repeats=3
"""

import json
import os

import jax
from absl import app, flags

from erg_jax import benchmark as B

FLAGS = flags.FLAGS
flags.DEFINE_list("only", ["attention"], "which benchmarks to run: attention")
flags.DEFINE_string("out", None, "JSON file to write")
flags.DEFINE_list("lengths", ["256", "1024", "4096"], "token counts for the attention table")
flags.DEFINE_integer("repeats", 7, "timed rounds per contender (medians are reported)")

BENCHMARKS = ("attention",)


def _print_table(name, rows):
    print(f"\n## {name}")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print(
            "| "
            + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys)
            + " |"
        )


def main(argv):
    del argv
    unknown = set(FLAGS.only) - set(BENCHMARKS)
    if unknown:
        raise app.UsageError(f"--only: unknown benchmarks {sorted(unknown)}; known: {BENCHMARKS}")
    result = {
        "device": str(jax.devices()[0]),
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
    }
    if "attention" in FLAGS.only:
        rows = B.attention_table([int(x) for x in FLAGS.lengths], repeats=FLAGS.repeats)
        result["attention"] = rows
        _print_table("attention (steps=1, batch 1, 8 heads, head_dim 64)", rows)
    if FLAGS.out:
        os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
