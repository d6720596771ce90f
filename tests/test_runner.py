import json
import re
import subprocess
import sys

import numpy as np
import pytest

from hwnas import runner
from hwnas.profile import ROUNDS


def test_trimmed_stats_drop_the_tails():
    samples = [1.0] * 36 + [50.0, 0.01, 60.0, 0.02]
    s = runner.trimmed_stats(samples)
    assert s["mean_ms"] == pytest.approx(1.0) and s["median_ms"] == 1.0 and s["std_ms"] == 0.0
    assert s["n"] == 36
    with pytest.raises(runner.RunnerError):
        runner.trimmed_stats([])


def test_merge_rounds_keeps_the_median_of_the_round_medians():
    rounds = [{"measured": {"median_ms": m, "std_ms": sd, "n": 10}} for m, sd in ((1.0, 0.1), (3.0, 0.3), (2.0, 0.2))]
    m = runner.merge_rounds([{**rounds[0], "config": {"x": 1}, "phase": "decode.c8"}, *rounds[1:]])
    assert m["measured"] == {"mean_ms": 2.0, "std_ms": 0.2, "median_ms": 2.0, "n": 30}
    assert m["rounds_ms"] == [1.0, 3.0, 2.0] and (m["config"], m["phase"]) == ({"x": 1}, "decode.c8")


def test_make_input_fills():
    rng = np.random.default_rng(0)
    a = runner.make_input({"shape": [1, 4], "dtype": "int64", "fill": "arange", "start": 7}, rng)
    assert a.tolist() == [[7, 8, 9, 10]] and a.dtype == np.int64
    r = runner.make_input({"shape": [2, 50], "dtype": "int64", "fill": "randint", "high": 5}, rng)
    assert r.min() >= 0 and r.max() < 5
    assert runner.make_input({"shape": [1, 3, 0, 8], "dtype": "float32", "fill": "zeros"}, rng).shape == (1, 3, 0, 8)
    with pytest.raises(runner.RunnerError, match="fill 'gaussian'"):
        runner.make_input({"shape": [1], "dtype": "float32", "fill": "gaussian"}, rng)


def test_device_id_is_file_name_safe():
    info = runner.cpu_info()
    assert re.fullmatch(r"cpu-[a-z0-9-]+-[a-z0-9_]+-t3", runner.device_id(info, 3))
    assert runner.device_id({"kind": "cuda", "name": "NVIDIA H200"}) == "cuda-nvidia-h200"


def test_device_id_tells_apart_cpu_generations_behind_one_vendor_name():
    zen4 = {"kind": "cpu", "name": "AMD EPYC", "part": "f25m17", "isa": "avx512vnni", "cores": 2}
    zen5 = {**zen4, "part": "f26m2"}
    assert runner.device_id(zen4) == "cpu-amd-epyc-f25m17-avx512vnni-t2" != runner.device_id(zen5)
    named = {**zen4, "name": "AMD EPYC 9654 96-Core Processor"}  # the name already says which part
    assert runner.device_id(named) == "cpu-amd-epyc-9654-avx512vnni-t2"
    assert runner.device_id({**zen4, "part": None}) == "cpu-amd-epyc-avx512vnni-t2"  # /proc/cpuinfo did not say
    arm = {"kind": "cpu", "name": "aarch64", "part": "0x41-0xd0b", "isa": "neon", "cores": 4}
    assert runner.device_id(arm, 4) == "cpu-aarch64-0x41-0xd0b-neon-t4"


@pytest.fixture(scope="module")
def blocks_dir(tiny_model, tmp_path_factory):
    from hwnas.profile import profile

    d = tmp_path_factory.mktemp("blocks") / "int8"
    r = profile(model=str(tiny_model), runtime="onnxruntime", precision="int8", calibration=1, warmup=1, repeats=4,
                export_blocks=d, progress=False)
    # 16 blocks, 8 MLP blocks with down_proj kept fp32 (int8 mixed precision) and 2 end-to-end phases, per round
    assert r["items"] == (16 + 8 + 2) * ROUNDS and not (d / runner.MEASUREMENTS).exists()
    return d


def test_runner_needs_neither_torch_nor_transformers(blocks_dir):
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            "from hwnas.runner import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, str(blocks_dir), "--repeats", "4", "--warmup", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    meas = json.loads((blocks_dir / runner.MEASUREMENTS).read_text())
    manifest = json.loads((blocks_dir / runner.MANIFEST).read_text())
    assert set(meas["items"]) == {it["key"] for it in manifest["items"]}
    assert meas["header"]["device"]["id"] == runner.device_id(runner.cpu_info(), manifest["threads"])
    assert all(v["median_ms"] > 0 and len(v["samples_ms"]) == 4 for v in meas["items"].values())


def test_runner_resumes_and_refuses_foreign_measurements(blocks_dir, tmp_path):
    path = blocks_dir / runner.MEASUREMENTS
    if not path.exists():
        runner.run(blocks_dir, repeats=4, warmup=1, progress=False)
    meas = json.loads(path.read_text())
    kept = dict(meas["items"])
    dropped = sorted(kept)[0]
    del meas["items"][dropped]
    path.write_text(json.dumps(meas))
    r = runner.run(blocks_dir, repeats=4, warmup=1, progress=False)
    assert r["measured"] == 1
    again = json.loads(path.read_text())["items"]
    assert all(again[k] == v for k, v in kept.items() if k != dropped)  # the rest is untouched
    meas["header"]["manifest_digest"] = "0000"
    path.write_text(json.dumps(meas))
    with pytest.raises(runner.RunnerError, match="another manifest"):
        runner.run(blocks_dir, progress=False)
    path.write_text(json.dumps({**meas, "header": {**meas["header"], "manifest_digest": json.loads(
        (blocks_dir / runner.MANIFEST).read_text())["digest"]}, "items": again}))


def test_runner_rejects_a_folder_without_manifest(tmp_path):
    with pytest.raises(runner.RunnerError, match="no manifest.json"):
        runner.run(tmp_path)
    (tmp_path / runner.MANIFEST).write_text("{not json")
    with pytest.raises(runner.RunnerError, match="not valid JSON"):
        runner.run(tmp_path)


def test_import_measurements_makes_a_table(blocks_dir, tmp_path, run_cli):
    if not (blocks_dir / runner.MEASUREMENTS).exists():
        runner.run(blocks_dir, repeats=4, warmup=1, progress=False)
    out = tmp_path / "t.json"
    r = json.loads(run_cli("profile", "--import-measurements", str(blocks_dir), "--out", str(out)).stdout)
    table = json.loads(out.read_text())
    assert r["entries"] == 16 + 8 and r["calibration"] == 2  # with the 8 fp32-down_proj MLP blocks
    assert table["header"]["device"]["isa"] == runner.cpu_info()["isa"] and table["header"]["complete"]
    assert table["header"]["quantization"]["op_types_to_quantize"] == ["MatMul"]
    # a half-measured folder is refused with the missing keys
    meas = json.loads((blocks_dir / runner.MEASUREMENTS).read_text())
    gone = sorted(meas["items"])[-1]
    del meas["items"][gone]
    (blocks_dir / runner.MEASUREMENTS).write_text(json.dumps(meas))
    proc = run_cli("profile", "--import-measurements", str(blocks_dir), "--out", str(tmp_path / "u.json"), check=False)
    assert proc.returncode == 2 and "not measured yet" in proc.stderr and gone in proc.stderr
