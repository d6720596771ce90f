import json
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
