"""The README's quick sections run as written.

(a) The ```python blocks of "Using the library" run in order, in one fresh interpreter at
the repository root, and give what their comments say. (b) Every ``python -m`` command
line (indented code) of the quick sections runs as written from the repository root,
with small sizes appended (absl and ml_collections keep a flag's last value) and its
output folders moved into a temporary one; each test checks the files the README says
the command writes, and that the command's own flags reached the job. The sections on
published weights need downloads and are not read.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ("The two commands", "Using the library", "Sampling jobs", "The built-in models",
         "Benchmarks")  # fmt: skip
# The benchmark's six sections take minutes; tests/test_benchmark.py runs this very command
# with the same small flags, so it runs once in the suite.
ELSEWHERE = {
    "--out=out/bench.json": "tests/test_benchmark.py runs it with --small --repeats=1",
    "--only=attention,guidance": "tests/test_benchmark.py runs both sections (in the command "
    "above, --small) and --only through the launcher",
}


def section(title: str) -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index(f"\n## {title}\n") + len(title) + 5
    end = text.find("\n## ", start)
    return text[start : end if end >= 0 else None]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def command_lines(text: str) -> list[str]:
    """Indented ``python -m`` lines, continuation lines (ending in \\) joined."""
    out, pending = [], None
    for line in text.splitlines():
        s = line.strip()
        if pending is not None:
            pending += " " + s.removesuffix("\\").strip()
            if not s.endswith("\\"):
                out.append(pending)
                pending = None
        elif line.startswith("    ") and re.match(r"(\.venv/bin/)?python -m ", s):
            if s.endswith("\\"):
                pending = s.removesuffix("\\").strip()
            else:
                out.append(s)
    return out


def commands() -> list[tuple[str, str]]:
    return [(title, c) for title in QUICK for c in command_lines(section(title))]


def _groups() -> list[list[str]]:
    """The commands, those sharing an output folder together (a resumed run follows its
    first run), in README order."""
    groups: dict[str, list[str]] = {}
    for _, cmd in commands():
        target = re.search(r"--(?:workdir|out)=(\S+)", cmd)
        groups.setdefault(target.group(1) if target else cmd, []).append(cmd)
    return list(groups.values())


def _flag(argv: list[str], name: str, default=None):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    return values[-1] if values else default


def _small(argv: list[str], tmp: str) -> list[str]:
    """Small sizes for one command, appended after its own flags."""
    module = argv[argv.index("-m") + 1]
    if module == "launch.sample":
        return ["--config.output.num_samples=2", "--config.sampler.steps=2"]
    if module == "launch.train":
        variant = _flag(argv, "config").partition(":")[2]
        steps = int(_flag(argv, "config.train.steps", 2000)) // 1000  # resumes keep their order
        return [f"--config.train.steps={steps}", "--config.data.num_train=64",
                "--config.train.batch_size=8", "--config.train.warmup_steps=1",
                "--config.train.log_every=1", "--config.train.checkpoint_every=1",
                "--config.progress=False", f"--config.export={tmp}/export/{variant}"]  # fmt: skip
    if module == "launch.benchmark":
        out = [] if _flag(argv, "out") else [f"--out={tmp}/bench-{len(argv)}.json"]
        return ["--small", "--repeats=1"] + out
    raise AssertionError(f"no small sizes for {module}: add them to tests/test_readme.py")


def _as_written(cmd: str, tmp: str) -> list[str]:
    argv = shlex.split(cmd)
    if argv[0] == "python" or not os.path.exists(os.path.join(ROOT, argv[0])):
        argv[0] = sys.executable
    moved = [re.sub(r"^--(workdir|out)=", rf"--\1={tmp}/", a) for a in argv]
    return moved + _small(moved, tmp)


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stderr[-3000:]}"


def test_the_quick_sections_hold_the_commands_they_describe():
    found = [(title, shlex.split(c)[2]) for title, c in commands()]
    assert found.count(("Sampling jobs", "launch.sample")) >= 3, found
    assert ("The built-in models", "launch.train") in found, found
    assert ("Benchmarks", "launch.benchmark") in found, found
    assert not any("pretrained" in c for _, c in commands())  # published weights stay out
    assert len(python_blocks(section("Using the library"))) >= 2


def _same(stored, written: str) -> bool:
    try:
        return float(stored) == float(written)
    except (TypeError, ValueError):
        return str(stored) == written


def _check_sample(cmd: str, argv: list[str]) -> None:
    workdir = _flag(argv, "workdir")
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    config = summary["config"]
    for arg in shlex.split(cmd):  # the command's own --config.a.b=v reached the job
        if arg.startswith("--config."):
            key, value = arg[len("--config.") :].split("=", 1)
            node = config
            for part in key.split("."):
                node = node[part]
            assert _same(node, value), (key, node)
    methods = config["guidance"]["methods"].split(",")
    assert sorted(summary["methods"]) == sorted(methods)
    for name in ("manifest.json", "index.html"):
        assert os.path.isfile(os.path.join(workdir, name)), name
    ext = ".mp4" if config["video"]["num_frames"] else ".png"  # a video model's samples
    for m in methods:
        for i in range(2):
            assert os.path.isfile(os.path.join(workdir, m, f"{i:08d}{ext}")), (m, i)
        lines = open(os.path.join(workdir, m, "samples.jsonl")).read().splitlines()
        assert [json.loads(line)["index"] for line in lines] == [0, 1]
        assert os.path.isfile(os.path.join(workdir, f"{m}_grid.png"))


def _check_train(runs: list[list[str]], tmp: str) -> None:
    workdir = _flag(runs[0], "workdir")
    variant = _flag(runs[0], "config").partition(":")[2]
    export = os.path.join(tmp, "export", variant)
    stored = json.load(open(os.path.join(export, "config.json")))
    assert stored["kind"] == ("classifier" if variant == "classifier" else variant)
    if variant == "classifier":
        assert os.path.isfile(os.path.join(workdir, "classifier.json"))
        return
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    # each later command resumes where the one before stopped (a restart would log 1.. again)
    last = int(_flag(runs[-1], "config.train.steps"))
    assert steps == list(range(1, last + 1)), steps


def _check_benchmark(argv: list[str]) -> None:
    from erg_jax.jobs.benchmark import SECTIONS

    result = json.load(open(_flag(argv, "out")))
    only = _flag(argv, "only")
    assert set(only.split(",") if only else SECTIONS) <= set(result), sorted(result)


def _slow(cmds: list[str]) -> bool:
    return any("launch.benchmark" in c for c in cmds)


@pytest.mark.parametrize(
    "cmds",
    [pytest.param(g, marks=[pytest.mark.slow] if _slow(g) else []) for g in _groups()],
    ids=lambda g: re.sub(r"\W+", "-", " ".join(shlex.split(g[0])[2:4]))[:60],
)
def test_readme_command_runs_as_written(cmds, tmp_path):
    for cmd in cmds:
        for text, reason in ELSEWHERE.items():
            if text in cmd:
                pytest.skip(reason)
    tmp = str(tmp_path)
    runs = [_as_written(cmd, tmp) for cmd in cmds]
    for argv in runs:
        _run(argv)
    module = runs[0][runs[0].index("-m") + 1]
    if module == "launch.sample":
        _check_sample(cmds[0], runs[0])
    elif module == "launch.train":
        _check_train(runs, tmp)
    else:
        _check_benchmark(runs[0])


EPILOGUE = """
import json, numpy as np
print("README-RESULT", json.dumps({
    "images": {m: [list(a.shape), str(a.dtype)] for m, a in out.images.items()},
    "tau": out.settings["erg"]["guidance"]["erg"]["tau"],
    "flags": pipe.job_flags(out.settings["erg"]),
    "attention": list(attn.shape),
    "x0": list(x0.shape),
    "x0_max": float(np.max(np.abs(np.asarray(x0)))),
}))
"""


def test_using_the_library_blocks_run_as_written():
    code = "\n".join(python_blocks(section("Using the library"))) + EPILOGUE
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("README-RESULT ")][-1]
    got = json.loads(line.split(" ", 1)[1])
    assert got["images"] == {m: [[2, 32, 32, 3], "uint8"] for m in ("cfg", "erg")}
    assert got["tau"] == 0.5 and "--config.model.checkpoint=models/demo-mmdit" in got["flags"]
    assert got["attention"] == [2, 16, 4, 8]
    assert got["x0"] == [8, 32, 32, 3] and got["x0_max"] < 1.5
