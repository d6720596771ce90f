"""`hwnas run`: the whole chain on the tiny model, against its measured onnxruntime fp32 table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hwnas.common import HwnasError


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tiny_tables, tmp_path_factory) -> Path:
    import dataclasses

    from hwnas import pipeline

    out = tmp_path_factory.mktemp("run") / "run"
    # the tiny model's tokenizer spells long PIQA answers past its 256 positions: a smaller task sample
    # and a healing of two optimizer steps (8 x 256 tokens each)
    small = dataclasses.replace(pipeline.BUDGETS["quick"], tasks=("lambada", "arc_easy"), task_items=20,
                                heal_tokens=4096)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(pipeline.BUDGETS, "quick", small)
        pipeline.run(model=str(tiny_model), runtime="onnxruntime", precision="fp32", latency_ratio=0.8,
                     table=tiny_tables["onnxruntime"], out=out, progress=False)
    return out


def test_run_deploys_benchmarks_and_reports(tiny_run):
    report = json.loads((tiny_run / "report.json").read_text())
    chosen = report["chosen"]
    assert chosen["latency_ratio"] <= 0.8
    # the deployed sub-network is the chosen config, exported to ONNX and loadable by the runtime
    sub = json.loads((tiny_run / "subnet" / "hwnas_subnet.json").read_text())
    assert sub == chosen["config"]
    assert (Path(report["artifacts"]["subnet"]) / "model.onnx").is_file()
    # what ships is the healed sub-network: the same shape, distilled, deployed and timed against the full model
    healed = json.loads((tiny_run / "healed" / "hwnas_heal.json").read_text())
    assert healed["tokens"] == 4096 and healed["complete"] and report["healing"]["tokens"] == 4096
    assert json.loads((tiny_run / "healed" / "hwnas_subnet.json").read_text()) == chosen["config"]
    bench = report["benchmark"]
    assert set(bench) == {"full", "healed"}
    assert all(bench[k]["decode_ms_per_token"] > 0 and bench[k]["file_bytes"] > 0 for k in bench)
    assert bench["healed"]["file_bytes"] < bench["full"]["file_bytes"]
    h = report["headline"]
    assert h["shipped"] == "healed"
    assert h["decode_speedup_vs_full"] == pytest.approx(bench["full"]["decode_ms_per_token"] / bench["healed"]["decode_ms_per_token"])
    assert set(h["perplexity"]) == {"full", "subnet", "healed"}
    assert h["generation"]["healed"]["prompt"] == "The capital of France is"
    for name in ("full", "subnet", "healed"):
        q = report["quality"][name]
        assert q["runtime"] == "onnx" and q["perplexity"]["perplexity"] > 1
        acc = q["accuracy"]
        assert acc["runtime"] == "onnxruntime" and list(acc["tasks"]) == ["lambada", "arc_easy"]
        assert all(t["n"] == 20 for t in acc["tasks"].values()) and 0 <= acc["mean_acc_norm_or_acc"] <= 1
    assert "| lambada | arc_easy | mean acc |" in (tiny_run / "report.md").read_text()
    md = (tiny_run / "report.md").read_text()
    assert "search/pareto.png" in md and (tiny_run / "search" / "pareto.png").is_file()
    assert "hwnas run" in md and "## Reproduce" in md
    assert "## Healing" in md and "hwnas heal --model" in md and "healed/heal_curve.png" in md


def test_run_on_a_fused_table_measures_against_a_fused_fp32_reference(tiny_model, tmp_path):
    """int8-wo deploys onnxruntime's fused attention; the fp32 reference of the same run gets it too, so that the
    whole-stack ratio compares quantization and search alone."""
    import dataclasses

    from hwnas import pipeline
    from hwnas.export import fused_attention
    from hwnas.profile import profile

    table = profile(model=str(tiny_model), runtime="onnxruntime", precision="int8-wo", calibration=1, warmup=1,
                    repeats=3, prefill=[16], decode=[16], out=tmp_path / "wo.json", progress=False)["table"]
    small = dataclasses.replace(pipeline.BUDGETS["quick"], tasks=("lambada",), task_items=10, perplexity_passages=10,
                                rounds=1, heal_tokens=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(pipeline.BUDGETS, "quick", small)
        pipeline.run(model=str(tiny_model), runtime="onnxruntime", precision="int8-wo", latency_ratio=0.9, table=table,
                     out=tmp_path / "run", progress=False)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(report["artifacts"]) == {"full_fp32", "full", "subnet"}
    assert all(fused_attention(Path(p)) for p in report["artifacts"].values())
    assert report["headline"]["fused_attention"] and report["headline"]["decode_speedup_vs_full_fp32"] > 0
    assert "(fused attention in both)" in (tmp_path / "run" / "report.md").read_text()


def test_run_resumes_from_its_finished_steps(tiny_run, tiny_model, tiny_tables):
    from hwnas.pipeline import run

    before = (tiny_run / "benchmark.json").stat().st_mtime_ns
    run(model=str(tiny_model), runtime="onnxruntime", precision="fp32", latency_ratio=0.8, table=tiny_tables["onnxruntime"],
        out=tiny_run, resume=True, heal_tokens=4096, progress=False)
    assert (tiny_run / "benchmark.json").stat().st_mtime_ns == before  # nothing measured twice
    # a run saved by an older hwnas lacks arguments added since: they read as their default (None)
    saved = json.loads((tiny_run / "run_args.json").read_text())
    (tiny_run / "run_args.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "threads"}))
    run(model=str(tiny_model), runtime="onnxruntime", precision="fp32", latency_ratio=0.8, table=tiny_tables["onnxruntime"],
        out=tiny_run, resume=True, heal_tokens=4096, progress=False)
    with pytest.raises(HwnasError, match="arguments differ"):
        run(model=str(tiny_model), runtime="onnxruntime", precision="fp32", latency_ratio=0.7,
            table=tiny_tables["onnxruntime"], out=tiny_run, resume=True, heal_tokens=4096, progress=False)
    with pytest.raises(HwnasError, match="not empty"):
        run(model=str(tiny_model), runtime="onnxruntime", precision="fp32", table=tiny_tables["onnxruntime"], out=tiny_run,
            progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(runtime="onnxruntime", precision="int8"), "does not match the target"),  # an fp32 table for an int8 deployment
    (dict(runtime="onnxruntime"), "asked 'int8-wo'"),  # the default precision for onnxruntime
    (dict(runtime="openvino"), "asked 'int8'"),
    (dict(runtime="tensorrt", precision="int8"), "cannot deploy tensorrt/int8; expected one of"),
    (dict(runtime="onnxruntime", precision="fp32", budget="huge"), "unknown budget 'huge'"),
    (dict(runtime="onnxruntime", precision="fp32", latency_ratio=1.5), r"must be in \(0, 1\]"),
])
def test_run_refuses_a_table_or_target_that_does_not_match(kwargs, match, tiny_model, tiny_tables, tmp_path):
    from hwnas.pipeline import run

    with pytest.raises(HwnasError, match=match):
        run(model=str(tiny_model), table=tiny_tables["onnxruntime"], out=tmp_path / "r", progress=False, **kwargs)
    assert not (tmp_path / "r").exists()  # refused before the run's folder (and its run_args.json) is made


def test_every_quantized_target_has_its_method_and_the_settings_its_table_records():
    from hwnas.tables import PRECISIONS
    from hwnas.deploy import DEPLOY_METHODS
    from hwnas.quantize import METHODS, settings_for

    for (runtime, precision), method in DEPLOY_METHODS.items():
        assert method in METHODS and precision in PRECISIONS[runtime]
        assert settings_for(runtime, precision, "avx512vnni")["method"]
    assert settings_for("onnxruntime", "int8-wo", "avx2") == settings_for("onnxruntime", "int8-wo", "avx512vnni")
