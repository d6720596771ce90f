"""benchmarks/reliability.py --quick: a handful of bad inputs through the real CLI, each judged and reported."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "reliability.py"


def _module():
    spec = importlib.util.spec_from_file_location("reliability", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up
    spec.loader.exec_module(mod)
    return mod


def test_the_case_table_covers_every_command_that_takes_user_input():
    mod = _module()
    names = [c.name for c in mod.CASES]
    assert len(names) == len(set(names)) and len(names) >= 60
    commands = {c.command for c in mod.CASES}
    assert commands >= {"space", "sample", "export", "onnx", "gguf", "quantize", "profile", "predict",
                        "validate-latency", "search", "baseline", "run", "heal", "train-supernet", "benchmark",
                        "evaluate", "perplexity", "generate"}
    assert all(c.args[0] == c.command for c in mod.CASES)  # each case runs the command it is filed under
    assert {n for c in mod.CASES for n in c.needs} <= set(mod.FIXTURES)


def test_quick_audit_reports_every_case_clean(tmp_path, hwnas_home):
    results = tmp_path / "results"
    # the default work folder: a temporary one that the unprivileged user of the read-only case can reach
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--results", str(results)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((results / "reliability.json").read_text())
    summary = json.loads(proc.stdout)
    assert summary == {k: v for k, v in report["summary"].items() if k != "by_command"}
    cases = report["cases"]
    assert report["meta"]["quick"] and len(cases) == sum(c.quick for c in _module().CASES) >= 3
    for case in cases:
        assert "skipped" in case or set(case) >= {"name", "command", "bad", "argv", "exit", "error_line", "traceback",
                                                  "stdout_ok", "written", "clean"}
    ran = [c for c in cases if "skipped" not in c]
    assert ran and all(c["clean"] for c in ran), [c for c in ran if not c["clean"]]
    assert all(c["exit"] == 2 and c["last_line"].startswith("hwnas: error:") for c in ran)
    md = (results / "reliability.md").read_text()
    assert f"**{len(ran)} of {len(ran)} bad inputs got the one-line error**" in md and "None." in md


def test_a_failing_case_is_reported_with_what_went_wrong(tmp_path):
    """The judge itself: a 'command' that writes a file, prints a traceback and exits 1 is a failure on each count."""
    mod = _module()
    fx = {"tiny": tmp_path / "fixtures" / "tiny"}
    fx["tiny"].mkdir(parents=True)
    case = mod.Case("writes", "space", "a misbehaving command", ("space",),
                    prep=lambda d, f: (d / "in.txt").write_text("x"))
    real_run = mod.subprocess.run

    def fake_run(cmd, **kw):  # the case's folder is its cwd
        Path(kw["cwd"], "out.txt").write_text("half")
        return subprocess.CompletedProcess(cmd, 1, "not json", "Traceback (most recent call last):\nIndexError: x\n")

    mod.subprocess.run = fake_run
    try:
        r = mod.run_case(case, tmp_path, fx, {"HWNAS_HOME": str(tmp_path)})
    finally:
        mod.subprocess.run = real_run
    assert not r["clean"] and r["exit"] == 1 and r["traceback"] and not r["error_line"] and not r["stdout_ok"]
    assert r["written"] == ["+out.txt"]
    assert mod.why(r) == ("exit 1; traceback; last stderr line is not `hwnas: error: ...`; stdout is not JSON; "
                          "wrote +out.txt")
