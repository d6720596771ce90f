"""Fault tests: each long-running command is SIGKILLed at a seeded random point, then resumed (profile, search,
heal, train-supernet) or rerun (onnx, quantize: atomic); the result must equal an uninterrupted run's, with no
temporary or lock left behind. A second run on an output that is being written is refused."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from hwnas.heal import checkpoint_dir

# the tiny model's uniform sub-network (plain `llama`), as tests/test_heal.py heals it
UNIFORM = {"num_layers": 4, "layers": [0, 2, 3], "mlp": [192] * 3, "heads": [4] * 3, "kv_heads": [2] * 3}
POLL_S = 0.05
DEADLINE_S = 300
# hwnas.common's temporaries (`.NAME.hwnas-HOST-PID-XXXX.tmp`, `.NAME.hwnas-HOST-PID-old`), its lock files, and the
# training checkpoint's own `.trainable-*.tmp` files
LEFTOVER = re.compile(r"^\..*\.hwnas-.*|^\..*\.lock$|^\..*\.tmp$")

# seed 0 runs by default; the other seeds put the kill elsewhere and only run with the slow tests
SEEDS = [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)]


# ------------------------------------------------------------------------------ helpers
def _env(home: Path) -> dict[str, str]:
    # one thread: the tiny model gains nothing from more, and training is then bitwise reproducible
    return {**os.environ, "HWNAS_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONFAULTHANDLER": "1"}


def _cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "hwnas.cli", *args]


def _run(home: Path, args: list[str], log: Path) -> subprocess.CompletedProcess:
    """Run to the end; a hang is aborted with a Python traceback of every thread (faulthandler) in `log`."""
    with open(log, "w") as err:
        proc = subprocess.Popen(_cmd(args), stdout=subprocess.PIPE, stderr=err, text=True, env=_env(home))
        try:
            stdout, _ = proc.communicate(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            proc.communicate(timeout=60)
            raise AssertionError(f"hwnas {' '.join(args)} hung:\n{log.read_text()[-6000:]}") from None
    stderr = log.read_text()
    assert proc.returncode == 0, f"hwnas {' '.join(args)} failed ({proc.returncode}):\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    json.loads(stdout)  # stdout is the command's JSON result only
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _start(home: Path, args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:  # a file, not a pipe: a full pipe would block the child
        return subprocess.Popen(_cmd(args), stdout=f, stderr=subprocess.STDOUT, env=_env(home))


def _wait_for(proc: subprocess.Popen, trigger: Callable[[], bool]) -> float | None:
    """Poll every POLL_S until `trigger()` holds (returns the seconds since now) or the process ends (None)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < DEADLINE_S:
        if proc.poll() is not None:
            return None
        try:
            if trigger():
                return time.monotonic() - t0
        except (OSError, ValueError):  # a file being replaced right now: look again
            pass
        time.sleep(POLL_S)
    proc.kill()
    raise AssertionError("the command neither reached the kill point nor finished in time")


def _kill(proc: subprocess.Popen) -> bool:
    """SIGKILL `proc`; False when it had already finished (then it must have succeeded)."""
    if proc.poll() is not None:
        assert proc.returncode == 0, f"the run to be killed failed by itself ({proc.returncode})"
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return True


def _kill_when(home: Path, args: list[str], log: Path, trigger: Callable[[], bool]) -> bool:
    proc = _start(home, args, log)
    _wait_for(proc, trigger)
    return _kill(proc)


def _step(state_file: Path) -> int:
    return json.loads(state_file.read_text())["step"] if state_file.is_file() else -1


def _leftovers(out: Path) -> list[Path]:
    """hwnas temporaries and locks beside `out` or anywhere inside it."""
    found = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and LEFTOVER.match(p.name)]
    if out.is_dir():
        found += [p for p in out.rglob(".*") if LEFTOVER.match(p.name)]
    return found


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    import torch

    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    # on one thread, CPU training (bf16 autocast included) is deterministic: a resume must be bitwise exact
    bad = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not bad, f"resumed weights differ from the uninterrupted run's: {bad[:5]}"


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def subnet(tiny_model, tmp_path_factory, export_subnets) -> Path:
    return export_subnets(tiny_model, tmp_path_factory.mktemp("fault_subnets"), {"uniform": UNIFORM})["uniform"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory, hwnas_home):
    """Uninterrupted runs, one per argument list, shared by the seeds of a test: (out folder, seconds until `out`
    was published, seconds until its first temporary appeared beside `out`)."""
    done: dict[tuple, tuple[Path, float, float | None]] = {}

    def run(name: str, args: Callable[[Path], list[str]]) -> tuple[Path, float, float | None]:
        out = tmp_path_factory.mktemp(f"clean_{name}") / "out"
        key = tuple(args(Path("OUT")))
        if key not in done:
            t0 = time.monotonic()
            proc = _start(hwnas_home, args(out), out.parent / "log")
            appeared = _wait_for(proc, lambda: any(p.name.startswith(".out.hwnas-") for p in out.parent.iterdir()))
            published = _wait_for(proc, out.exists)
            published = time.monotonic() - t0 if published is None else (appeared or 0) + published
            proc.wait(timeout=DEADLINE_S)
            log = (out.parent / "log").read_text()
            assert proc.returncode == 0, log[-3000:]
            done[key] = (out, published, appeared)
        return done[key]

    return run


# ------------------------------------------------------------------------------ the long commands
def _search_args(tiny_model: Path, table: Path) -> Callable[[Path], list[str]]:
    return lambda out: ["search", "--model", str(tiny_model), "--table", str(table), "--evaluations", "12",
                        "--population", "4", "--calibration-source", "lambada", "--seed", "3", "--out", str(out)]


@pytest.mark.parametrize("seed", SEEDS)
def test_search_killed_and_resumed_equals_an_uninterrupted_search(seed, tiny_model, tiny_tables, clean, hwnas_home,
                                                                   tmp_path):
    args = _search_args(tiny_model, tiny_tables["torch"])
    ref, _, _ = clean("search", args)
    generations = json.loads((ref / "state.json").read_text())["generation"]
    k = random.Random(seed).randint(1, max(1, generations - 1))  # killed after generation k was saved
    out = tmp_path / "out"
    state = out / "state.json"
    killed = _kill_when(hwnas_home, args(out), tmp_path / "log",
                        lambda: state.is_file() and json.loads(state.read_text())["generation"] >= k)
    if killed:  # the lock of the killed run is still on disk; the resume takes it over
        assert (tmp_path / ".out.lock").exists()
    _run(hwnas_home, args(out) + ["--resume"], tmp_path / "resume.log")
    assert (out / "evaluations.csv").read_text() == (ref / "evaluations.csv").read_text()
    assert json.loads((out / "pareto.json").read_text())["front"] == json.loads((ref / "pareto.json").read_text())["front"]
    assert _files(out) == _files(ref)
    assert not _leftovers(out)


@pytest.mark.parametrize("resume", [True, False])
def test_search_killed_before_its_first_state_write_reruns_or_resumes(resume, tiny_model, tiny_tables, clean,
                                                                      hwnas_home, tmp_path):
    """A search SIGKILLed before state.json exists, inside its first write of it: the temporary it leaves in `out`
    does not make the rerun refuse, with --resume (nothing to resume: it starts afresh) or without."""
    args = _search_args(tiny_model, tiny_tables["torch"])
    ref, _, _ = clean("search", args)
    out = tmp_path / "out"
    proc = _start(hwnas_home, args(out), tmp_path / "log")
    # killed once it holds its output (the lock is taken before the model loads), before any state is saved
    _wait_for(proc, lambda: (tmp_path / ".out.lock").exists())
    assert _kill(proc) and not (out / "state.json").exists()
    # what a kill inside that first write leaves (a window of microseconds, too brief to hit reliably)
    out.mkdir(exist_ok=True)
    temp = out / f".state.json.hwnas-{socket.gethostname()}-{proc.pid}-x1y2z3.tmp"
    temp.write_text('{"kind": "hwnas-search-st')
    result = _run(hwnas_home, args(out) + (["--resume"] if resume else []), tmp_path / "rerun.log")
    assert "Traceback" not in result.stderr and "hwnas: error" not in result.stderr
    assert (out / "evaluations.csv").read_text() == (ref / "evaluations.csv").read_text()
    assert _files(out) == _files(ref)
    assert not temp.exists() and not _leftovers(out)


def _heal_args(subnet: Path, tiny_model: Path, text: Path, tokens: int) -> Callable[[Path], list[str]]:
    return lambda out: ["heal", "--model", str(subnet), "--teacher", str(tiny_model), "--tokens", str(tokens),
                        "--train-text", str(text), "--seq-len", "32", "--batch-size", "4", "--micro-batch", "2",
                        "--checkpoint-every", "1", "--lr", "5e-3", "--seed", "1", "--out", str(out)]


HEAL_STEPS = 24


@pytest.mark.parametrize("seed", SEEDS)
def test_heal_killed_and_resumed_equals_an_uninterrupted_heal(seed, subnet, tiny_model, train_text, clean,
                                                               hwnas_home, tmp_path):
    args = _heal_args(subnet, tiny_model, train_text, HEAL_STEPS * 4 * 32)
    ref, _, _ = clean("heal", args)
    k = random.Random(seed).randint(2, HEAL_STEPS - 4)
    out = tmp_path / "out"
    state = checkpoint_dir(out) / "train_state.json"
    proc = _start(hwnas_home, args(out), tmp_path / "log")
    _wait_for(proc, lambda: _step(state) >= k)
    if seed == 0 and proc.poll() is None:
        # a second run on the same --out while the first holds it (stopped, so it cannot finish meanwhile)
        proc.send_signal(signal.SIGSTOP)
        second = subprocess.run(_cmd(args(out) + ["--resume"]), capture_output=True, text=True,
                                env=_env(hwnas_home), timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert "is being written by another hwnas run" in second.stderr
        assert second.stderr.strip().count("\n") == 0 and "Traceback" not in second.stderr
    killed = _kill(proc)
    if killed:
        assert 0 <= _step(state) < HEAL_STEPS and not (out / "model.safetensors").exists()
    _run(hwnas_home, args(out) + ["--resume"], tmp_path / "resume.log")
    _assert_same_weights(out, ref)
    assert _files(out) == _files(ref)
    assert not checkpoint_dir(out).exists() and not _leftovers(out)


def _supernet_args(tiny_model: Path, text: Path, tokens: int) -> Callable[[Path], list[str]]:
    return lambda out: ["train-supernet", "--model", str(tiny_model), "--tokens", str(tokens), "--train-text",
                        str(text), "--seq-len", "16", "--batch-size", "4", "--micro-batch", "2", "--lr", "1e-2",
                        "--checkpoint-every", "1", "--seed", "1", "--out", str(out)]


SUPERNET_STEPS = 16


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_train_supernet_killed_and_resumed_equals_an_uninterrupted_training(seed, tiny_model, train_text, clean,
                                                                             hwnas_home, tmp_path):
    args = _supernet_args(tiny_model, train_text, SUPERNET_STEPS * 4 * 16)
    ref, _, _ = clean("supernet", args)
    k = random.Random(seed).randint(2, SUPERNET_STEPS - 4)
    out = tmp_path / "out"
    state = out / "checkpoint" / "train_state.json"
    if _kill_when(hwnas_home, args(out), tmp_path / "log", lambda: _step(state) >= k):
        assert not (out / "model.safetensors").exists() or _step(state) < SUPERNET_STEPS
        # what a kill inside a checkpoint's save leaves (too brief a moment for a random kill to hit reliably)
        (out / "checkpoint" / ".trainable-9999999.safetensors.tmp").write_bytes(b"partial")
    _run(hwnas_home, args(out) + ["--resume"], tmp_path / "resume.log")
    _assert_same_weights(out, ref)
    assert _files(out) == _files(ref)
    assert not _leftovers(out)


def _duplicate_keys(path: Path) -> list[str]:
    dups: list[str] = []

    def hook(pairs):
        keys = [k for k, _ in pairs]
        dups.extend(k for k in set(keys) if keys.count(k) > 1)
        return dict(pairs)

    json.loads(path.read_text(), object_pairs_hook=hook)
    return dups


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_profile_killed_and_resumed_loses_and_duplicates_no_entry(seed, tiny_model, hwnas_home, tmp_path):
    from hwnas.loading import read_llama_config
    from hwnas.space import SearchSpace
    from hwnas.tables import blocks_for

    out = tmp_path / "t.json"
    args = ["profile", "--model", str(tiny_model), "--runtime", "torch", "--calibration", "3", "--warmup", "0",
            "--repeats", "3", "--prefill", "8", "--decode", "8", "--out", str(out)]
    # the entries of an uninterrupted run are exactly the blocks of the space (tests/test_profile.py checks this);
    # timings differ run to run, so only the keys are compared
    space = SearchSpace.from_hf_config(read_llama_config(tiny_model))
    k = random.Random(seed).randint(3, 30)  # measured rounds (entries and pending) when killed

    def measured() -> int:
        t = json.loads(out.read_text())
        return len(t["entries"]) + sum(len(v) for v in t.get("pending", {}).values())

    if _kill_when(hwnas_home, args, tmp_path / "log", lambda: out.is_file() and measured() >= k):
        assert not json.loads(out.read_text())["header"]["complete"]
    _run(hwnas_home, args + ["--resume"], tmp_path / "resume.log")
    table = json.loads(out.read_text())
    assert table["header"]["complete"] and "pending" not in table and not _duplicate_keys(out)
    assert set(table["entries"]) == {b.key for b in blocks_for(space, table["header"]["phases"])}
    cal = [(c["index"], c["phase"]) for c in table["calibration"]]
    assert len(cal) == len(set(cal)) == 3 * 2
    assert not _leftovers(out)


def _atomic_case(name: str, args: Callable[[Path], list[str]], check: Callable[[Path], None], seed: int, clean,
                 hwnas_home: Path, tmp_path: Path) -> None:
    """Kill a command that publishes its output in one rename at a random 20-80% of its working time (from its
    temporary folder's appearance to its rename, as the uninterrupted run took); a plain rerun must succeed."""
    ref, published, appeared = clean(name, args)
    assert appeared is not None, "the uninterrupted run wrote no temporary beside its output"
    delay = random.Random(seed).uniform(0.2, 0.8) * (published - appeared)
    out = tmp_path / "out"
    proc = _start(hwnas_home, args(out), tmp_path / "log")
    _wait_for(proc, lambda: any(p.name.startswith(".out.hwnas-") for p in tmp_path.iterdir()))
    time.sleep(delay)
    _kill(proc)
    if out.exists():  # killed after its rename: all of it was published, and a plain rerun is refused cleanly
        assert _files(out) == _files(ref)
        again = subprocess.run(_cmd(args(out)), capture_output=True, text=True, env=_env(hwnas_home), timeout=300)
        assert again.returncode == 2 and "pass --overwrite" in again.stderr and again.stderr.count("\n") == 1
    else:  # nothing was published (its temporary is left, for the rerun to clean): a plain rerun succeeds
        assert any(p.name.startswith(".out.hwnas-") for p in tmp_path.iterdir())
        _run(hwnas_home, args(out), tmp_path / "rerun.log")
        assert _files(out) == _files(ref)
    check(out)
    assert not _leftovers(out)


def _loads_onnx(out: Path) -> None:
    import onnxruntime as ort

    ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("seed", SEEDS)
def test_onnx_killed_and_rerun_publishes_a_complete_folder(seed, subnet, clean, hwnas_home, tmp_path):
    _atomic_case("onnx", lambda out: ["onnx", "--model", str(subnet), "--out", str(out)], _loads_onnx, seed, clean,
                 hwnas_home, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantize_killed_and_rerun_publishes_a_complete_folder(seed, subnet, clean, hwnas_home, tmp_path):
    def check(out: Path) -> None:
        _loads_onnx(out)
        assert json.loads((out / "quantize.json").read_text())["method"] == "ort-int8"

    _atomic_case("quantize", lambda out: ["quantize", "--model", str(subnet), "--method", "ort-int8", "--samples", "1",
                                          "--out", str(out)], check, seed, clean, hwnas_home, tmp_path)
