"""Mutation testing: which one-line changes to a module do its tests miss?

    python scripts/mutate.py --module erg_jax/predictions.py \
        --tests tests/test_samplers.py tests/test_grids.py --max 40 \
        [--lines 60-120] [--timeout 120] [--pytest-args='-m "not parity"'] \
        [--out out/mutate_predictions.json]

The repository's files (git ls-files, tracked and untracked-but-not-ignored, so no
.venv) are copied once into a private temporary directory. Each mutant rewrites one line
of the module there, runs ``python -m pytest -x -q -p no:cacheprovider <tests>`` in that
copy and restores the line. A mutant is killed when pytest fails, survives when it
passes, and times out past --timeout. Mutants are found with ``ast``, so only code
changes (never docstrings or comments), and every mutant must still parse:
  + <-> -, * <-> /; < <-> <=, > <-> >=, == <-> !=; ints c -> c + 1 and floats
  c -> c * 1.1 (0 <-> 1 for both); True <-> False; and <-> or; unary minus removed.
See docs/TESTING.md for how to read the survivors.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SWAPS = {
    ast.Add: ("+", "-"),
    ast.Sub: ("-", "+"),
    ast.Mult: ("*", "/"),
    ast.Div: ("/", "*"),
    ast.Lt: ("<", "<="),
    ast.LtE: ("<=", "<"),
    ast.Gt: (">", ">="),
    ast.GtE: (">=", ">"),
    ast.Eq: ("==", "!="),
    ast.NotEq: ("!=", "=="),
    ast.And: ("and", "or"),
    ast.Or: ("or", "and"),
}


@dataclasses.dataclass(frozen=True)
class Mutant:
    line: int  # 1-based line number in the module
    start: int  # byte columns of the replaced span within that line
    end: int
    replacement: str
    original: str  # the whole line, before and after
    mutated: str


def _op_span(line: bytes, lo: int, hi: int, symbol: str) -> tuple[int, int] | None:
    """The span of ``symbol`` in line[lo:hi], the gap between two operands, where the
    gap holds only that symbol, whitespace and parentheses."""
    gap = line[lo:hi].decode()
    rest = gap.strip().strip("()").strip()
    if rest != symbol:
        return None
    at = gap.index(symbol)
    start = lo + len(gap[:at].encode())
    return start, start + len(symbol.encode())


def _edits(tree: ast.AST, lines: list[bytes]):
    """(line, start, end, replacement) for every candidate one-line edit."""
    for node in ast.walk(tree):
        pairs = []  # (left operand, right operand, operator)
        if isinstance(node, ast.BinOp):
            pairs = [(node.left, node.right, node.op)]
        elif isinstance(node, ast.Compare):
            lefts = [node.left, *node.comparators[:-1]]
            pairs = list(zip(lefts, node.comparators, node.ops, strict=True))
        elif isinstance(node, ast.BoolOp):
            pairs = [(a, b, node.op) for a, b in zip(node.values, node.values[1:], strict=False)]
        for left, right, op in pairs:
            if type(op) not in SWAPS or left.end_lineno != right.lineno:
                continue
            symbol, replacement = SWAPS[type(op)]
            line = lines[right.lineno - 1]
            span = _op_span(line, left.end_col_offset, right.col_offset, symbol)
            if span is not None:
                yield right.lineno, *span, replacement
        if isinstance(node, ast.Constant) and node.lineno == node.end_lineno:
            value = node.value
            if isinstance(value, bool):
                new = repr(not value)
            elif isinstance(value, int):
                new = {0: "1", 1: "0"}.get(value, repr(value + 1))
            elif isinstance(value, float):
                new = {0.0: "1.0", 1.0: "0.0"}.get(value, repr(value * 1.1))
            else:
                continue
            yield node.lineno, node.col_offset, node.end_col_offset, new
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            if node.lineno == node.operand.lineno:
                yield node.lineno, node.col_offset, node.operand.col_offset, ""


def find_mutants(source: str, lines_range: tuple[int, int] | None = None) -> list[Mutant]:
    """Every parsing, behaviour-changing one-line mutant of ``source``, in source order."""
    tree = ast.parse(source)
    reference = ast.dump(tree)
    lines = source.encode().splitlines(keepends=True)
    found = set()
    for lineno, start, end, replacement in _edits(tree, lines):
        if lines_range and not lines_range[0] <= lineno <= lines_range[1]:
            continue
        found.add((lineno, start, end, replacement))
    mutants = []
    for lineno, start, end, replacement in sorted(found):
        line = lines[lineno - 1]
        new_line = line[:start] + replacement.encode() + line[end:]
        new_source = b"".join(lines[: lineno - 1] + [new_line] + lines[lineno:]).decode()
        try:
            if ast.dump(ast.parse(new_source)) == reference:
                continue  # e.g. a span that rewrote to the same code
        except SyntaxError:
            continue
        mutants.append(
            Mutant(
                lineno,
                start,
                end,
                replacement,
                line.decode().rstrip("\n"),
                new_line.decode().rstrip("\n"),
            )
        )
    return mutants


def spread(items: list, n: int | None) -> list:
    """At most n items, evenly spaced over the list (deterministic)."""
    if n is None or n >= len(items):
        return items
    return [items[i * len(items) // n] for i in range(n)]


def copy_repo(dest: Path) -> None:
    """Copy the working tree's tracked and untracked-but-not-ignored files to dest."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    for name in out.decode().split("\0"):
        src = ROOT / name
        if name and src.is_file():  # deleted-but-tracked files are skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def pytest_env(copy: Path) -> dict:
    """The environment tests/conftest.py sets, with the copy first on the path."""
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=str(copy),
        PYTHONDONTWRITEBYTECODE="1",  # a restored line must not meet a stale .pyc
    )
    return env


def run_tests(cmd: list[str], copy: Path, timeout: float | None) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout', seconds, output tail)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=copy,
        env=pytest_env(copy),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # so a timeout can end pytest and its children
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        status = "passed" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status = "timeout"
    return status, time.monotonic() - t0, out.decode(errors="replace")[-3000:]


def parse_lines(text: str) -> tuple[int, int]:
    a, _, b = text.partition("-")
    return int(a), int(b or a)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", required=True, help="path of the module to mutate")
    parser.add_argument("--tests", nargs="+", required=True, help="test files or node ids")
    parser.add_argument("--max", type=int, default=None, help="cap on mutants, spread out")
    parser.add_argument("--lines", type=parse_lines, default=None, help="A-B: only these")
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per mutant (default: 3x baseline)"
    )
    parser.add_argument(
        "--pytest-args", default="", help='extra pytest arguments, e.g. -k "not slow"'
    )
    parser.add_argument("--out", default=None, help="JSON file (default out/mutate_<name>.json)")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    args = parser.parse_args(argv)

    module = Path(args.module)
    source = (ROOT / module).read_text()
    mutants = spread(find_mutants(source, args.lines), args.max)
    if args.list:
        for m in mutants:
            print(f"{m.line}: {m.original.strip()}  ->  {m.mutated.strip()}")
        print(f"{len(mutants)} mutants")
        return 0
    out_path = Path(args.out or f"out/mutate_{module.stem}.json")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    cmd += shlex.split(args.pytest_args) + list(args.tests)

    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        copy = Path(tmp)
        copy_repo(copy)
        target = copy / module
        # The copy, not an editable install of the repository, must be what gets imported.
        name = ".".join(module.with_suffix("").parts)
        probe = subprocess.run(
            [sys.executable, "-c", f"import {name} as m; print(m.__file__)"],
            cwd=copy,
            env=pytest_env(copy),
            capture_output=True,
            text=True,
        )
        if Path(probe.stdout.strip()).resolve() != target.resolve():
            sys.exit(f"the tests would import {probe.stdout.strip() or probe.stderr}, not the copy")

        status, base_s, tail = run_tests(cmd, copy, None)
        if status != "passed":
            print(tail)
            sys.exit(f"the tests fail without any mutation ({' '.join(cmd)}); fix them first")
        timeout = args.timeout or max(30.0, 3 * base_s)
        print(f"baseline passed in {base_s:.1f}s; {len(mutants)} mutants, timeout {timeout:.0f}s")

        results = []
        for i, m in enumerate(mutants, 1):
            lines = source.splitlines(keepends=True)
            lines[m.line - 1] = m.mutated + "\n"
            target.write_text("".join(lines))
            try:
                status, secs, _ = run_tests(cmd, copy, timeout)
            finally:
                target.write_text(source)
            result = {"passed": "survived", "failed": "killed"}.get(status, status)
            results.append(
                {
                    "line": m.line,
                    "original": m.original,
                    "mutated": m.mutated,
                    "result": result,
                    "seconds": round(secs, 1),
                }
            )
            where = f"[{i}/{len(mutants)}] {result:8s} {secs:5.1f}s  line {m.line}"
            print(f"{where}: {m.mutated.strip()}", flush=True)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(results, indent=1) + "\n")  # partial runs survive

    counts = {k: sum(r["result"] == k for r in results) for k in ("killed", "survived", "timeout")}
    print(
        f"\n{module}: {len(results)} mutants, {counts['killed']} killed, "
        f"{counts['survived']} survived, {counts['timeout']} timeouts  ({out_path})"
    )
    for r in results:
        if r["result"] != "killed":
            print(f"  {r['result']} line {r['line']}:\n  - {r['original'].strip()}")
            print(f"  + {r['mutated'].strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
