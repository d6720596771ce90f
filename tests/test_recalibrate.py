import json

import pytest

from hwnas import HwnasError
from hwnas.profile import profile


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_recalibrate_measures_the_calibration_again_and_keeps_the_blocks(runtime, tiny_tables, tiny_model, tmp_path):
    """A table whose calibration was measured on a (simulated) 1000x slower day: recalibration measures the same
    sub-networks again here, now; the blocks are untouched. (At 10x, a CI run beside other jobs once measured the
    tiny torch sub-networks 20x slower than when the table was made: the margin must outlast a loaded machine.)"""
    from hwnas.predictor import LatencyPredictor

    table = json.loads(tiny_tables[runtime].read_text())
    slow = [dict(c, measured={**c["measured"], "median_ms": 1000 * c["measured"]["median_ms"]})
            for c in table["calibration"]]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(dict(table, calibration=slow)))
    before = LatencyPredictor.load(path)
    out = profile(model=str(tiny_model), runtime=runtime, out=path, recalibrate=True, progress=False)
    done = json.loads(path.read_text())
    assert done["entries"] == table["entries"]
    assert [(c["config"], c["phase"]) for c in done["calibration"]] == [(c["config"], c["phase"]) for c in slow]
    assert done["header"]["recalibrated"]["previous_ms"] == [round(c["measured"]["median_ms"], 4) for c in slow]
    assert out["points"] == len(slow) and out["median_shift"] < 0.1  # back from the inflated figures (1.0 if kept)
    assert out["corrections"].keys() == before.corrections.keys()  # refitted on the new points, loadable


def test_recalibrate_resumes_where_it_was_interrupted(tiny_tables, tiny_model, tmp_path, monkeypatch):
    import hwnas.runner
    from hwnas.recalibrate import ROUNDS

    path = tmp_path / "t.json"
    path.write_bytes(tiny_tables["onnxruntime"].read_bytes())
    points = len(json.loads(path.read_text())["calibration"])
    real, calls, interrupt = hwnas.runner.measure_item, [], [5]

    def measure(*a, **k):  # Ctrl-C during the 5th measurement of the first call
        calls.append(1)
        if len(calls) == interrupt[0]:
            interrupt[0] = None
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(hwnas.runner, "measure_item", measure)
    with pytest.raises(KeyboardInterrupt):
        profile(model=str(tiny_model), runtime="onnxruntime", out=path, recalibrate=True, progress=False)
    assert "recalibrated" not in json.loads(path.read_text())["header"]  # the table is untouched until the end
    calls.clear()
    profile(model=str(tiny_model), runtime="onnxruntime", out=path, recalibrate=True, progress=False)
    assert len(calls) == ROUNDS * points - 4  # the 4 measured before the interruption are kept
    assert "recalibrated" in json.loads(path.read_text())["header"]


def test_recalibrate_refuses_what_it_cannot_measure(tiny_tables, tiny_model, tmp_path):
    with pytest.raises(HwnasError, match="no table .* to recalibrate"):
        profile(model=str(tiny_model), runtime="onnxruntime", out=tmp_path / "none.json", recalibrate=True)
    for flag in ({"overwrite": True}, {"import_measurements": tmp_path}):
        with pytest.raises(HwnasError, match="--recalibrate"):
            profile(model=str(tiny_model), runtime="onnxruntime", out=tiny_tables["onnxruntime"], recalibrate=True, **flag)
    table = json.loads(tiny_tables["onnxruntime"].read_text())
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(dict(table, header={**table["header"], "device": {**table["header"]["device"],
                                                                                   "id": "cpu-some-arm-board-t2"}})))
    with pytest.raises(HwnasError, match="cpu-some-arm-board-t2"):
        profile(model=str(tiny_model), runtime="onnxruntime", out=foreign, recalibrate=True)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(dict(table, calibration=[])))
    with pytest.raises(HwnasError, match="no calibration points"):
        profile(model=str(tiny_model), runtime="onnxruntime", out=empty, recalibrate=True)
