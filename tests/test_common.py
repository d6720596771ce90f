import json
import os
from pathlib import Path

import pytest

from hwnas.common import HwnasError, atomic_dir, atomic_write_json, home, read_json


def test_atomic_dir_leaves_nothing_when_the_body_fails(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_when_asked(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(HwnasError, match="not empty"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and [p.name for p in out.iterdir()] == ["b"]


def test_json_helpers_and_home(tmp_path, monkeypatch):
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert read_json(tmp_path / "x.json") == {"a": 1} and json.loads((tmp_path / "x.json").read_text())
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(HwnasError, match="bad.json is not valid JSON"):
        read_json(tmp_path / "bad.json")
    monkeypatch.setenv("HWNAS_HOME", str(tmp_path / "h"))
    assert home() == tmp_path / "h"


def test_openvino_telemetry_stays_inside_the_hwnas_folder():
    from openvino_telemetry.utils.opt_in_checker import OptInChecker

    from hwnas.common import home, point_library_caches

    point_library_caches()
    assert Path(OptInChecker.consent_file_base_dir()).is_relative_to(home())


def test_output_lock_refuses_a_second_run_and_is_taken_over_after_a_kill(tmp_path):
    import subprocess
    import sys

    from hwnas.common import output_lock

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom hwnas.common import output_lock\n"
                               f"with output_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(HwnasError, match=f"{out} is being written by another hwnas run \\(pid {holder.pid}"):
            with output_lock(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with output_lock(out) as lock:  # the killed run's lock file is still there: the OS released its lock
        assert lock.read_text().startswith(f"pid {os.getpid()}")
    assert not lock.exists()


def test_a_killed_runs_temporaries_are_removed_by_the_next_write(tmp_path):
    import socket

    from hwnas.common import atomic_dir, atomic_write_text, prepare_output

    dead = 2 ** 22 + 12345  # above Linux's default pid_max: no such process
    host = socket.gethostname()
    stale_dir = tmp_path / f".out.hwnas-{host}-{dead}-abc.tmp"
    stale_dir.mkdir()
    (stale_dir / "weights").write_text("half")
    stale_file = tmp_path / f".f.json.hwnas-{host}-{dead}-abc.tmp"
    stale_file.write_text("{")
    live = tmp_path / f".out.hwnas-{host}-{os.getpid()}-xyz.tmp"  # a live run's (this one's) is kept
    live.mkdir()
    atomic_write_text(tmp_path / "f.json", "{}")
    assert not stale_file.exists() and stale_dir.exists()
    with atomic_dir(tmp_path / "out") as d:
        (d / "a").write_text("1")
    assert not stale_dir.exists() and live.exists()
    prepare_output(tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out").exists()


def test_a_folder_holding_only_a_killed_runs_temporaries_counts_as_empty(tmp_path):
    import socket

    from hwnas.common import prepare_output

    host, dead = socket.gethostname(), 2 ** 22 + 12345
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".state.json.hwnas-{host}-{dead}-abc.tmp"  # killed inside its first write
    stale.write_text("{")
    assert prepare_output(out, overwrite=False) == out and not stale.exists()
    live = out / f".state.json.hwnas-{host}-{os.getpid()}-abc.tmp"  # a live run's is kept, and counts
    live.write_text("{")
    with pytest.raises(HwnasError, match="is an existing non-empty folder"):
        prepare_output(out, overwrite=False)
    assert live.exists()


def test_outputs_get_the_users_umask_and_refuse_read_only_or_foreign_targets(tmp_path, monkeypatch):
    from hwnas.common import atomic_dir, atomic_write_text, prepare_output

    old = os.umask(0o022)
    try:
        f = atomic_write_text(tmp_path / "f.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "a").write_text("1")
            (d / "sub").mkdir()
            (d / "sub" / "weights").write_text("w")
            os.chmod(d / "sub" / "weights", 0o600)  # as safetensors writes its files
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == 0o644 and (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "d" / "sub" / "weights").stat().st_mode & 0o777 == 0o644
    with pytest.raises(HwnasError, match="f.txt is an existing file; pass --overwrite"):
        prepare_output(f, overwrite=False)
    with pytest.raises(HwnasError, match="is an existing non-empty folder; pass --overwrite"):
        prepare_output(tmp_path / "d", overwrite=False)
    assert prepare_output(tmp_path / "d", overwrite=False, own=True) == tmp_path / "d"
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    monkeypatch.setattr("hwnas.common.os.access", lambda p, mode: Path(p) != ro)  # as a non-root user sees it
    with pytest.raises(HwnasError, match="is not writable"):
        with atomic_dir(ro):
            pass
    assert ro.stat().st_mode & 0o777 == 0o555
