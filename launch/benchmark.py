"""Benchmarks: prints the tables and writes JSON (docs/BENCHMARKS.md holds the latest).

python -m launch.benchmark --out=out/bench.json
python -m launch.benchmark --only=attention,guidance --repeats=3
python -m launch.benchmark --small --out=/tmp/bench.json     # the test suite's sizes
"""

import json
import os

from absl import app, flags

from erg_jax.jobs import benchmark as B

from . import logs

FLAGS = flags.FLAGS
flags.DEFINE_list("only", list(B.SECTIONS), f"sections to run: {','.join(B.SECTIONS)}")
flags.DEFINE_string("out", None, "JSON file to write")
flags.DEFINE_bool("small", False, "the smallest sizes (tiny models, short sequences)")
flags.DEFINE_list("lengths", None, "token counts for the attention table")
flags.DEFINE_integer("repeats", 5, "timed rounds per contender (medians are reported)")


def _fmt(x):
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _print(name, value, indent=""):
    if isinstance(value, dict):
        print(f"{indent}{name}:")
        for k, v in value.items():
            _print(k, v, indent + "  ")
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        print(f"{indent}{name}:")
        keys = list(value[0])
        print(indent + "  | " + " | ".join(keys) + " |")
        for row in value:
            cells = [_fmt(row[k]) if not isinstance(row[k], dict) else "..." for k in keys]
            print(indent + "  | " + " | ".join(cells) + " |")
        for i, row in enumerate(value):
            for k, v in row.items():
                if isinstance(v, dict):
                    _print(f"[{i}] {k}", v, indent + "  ")
    else:
        print(f"{indent}{name}: {_fmt(value)}")


def main(argv):
    del argv
    logs.set_up()
    unknown = set(FLAGS.only) - set(B.SECTIONS)
    if unknown:
        raise app.UsageError(f"--only: unknown benchmarks {sorted(unknown)}; known: {B.SECTIONS}")
    lengths = [int(x) for x in FLAGS.lengths] if FLAGS.lengths else None
    result = B.run(FLAGS.only, small=FLAGS.small, repeats=FLAGS.repeats, lengths=lengths)
    for name, value in result.items():
        _print(name, value)
    if FLAGS.out:
        os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
