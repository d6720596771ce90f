import json

import pytest

from hwnas import HwnasError
from hwnas.space import SearchSpace
from hwnas.validate_latency import spread_configs, validate_latency


def _space(path):
    return SearchSpace.from_hf_config(json.loads((path / "config.json").read_text()))


def test_spread_configs_are_seeded_distinct_and_span_the_size_range(tiny_model):
    space = _space(tiny_model)
    a, b = spread_configs(space, 10, 0), spread_configs(space, 10, 0)
    assert a == b and len(set(a)) == 10
    sizes = [sum(c.mlp) for c in a]
    assert sizes[0] < sizes[-1]
    assert spread_configs(space, 10, 1) != a
    assert space.max_config() not in spread_configs(space, 5, 0, exclude=[space.max_config()])


def test_validate_latency_end_to_end(tiny_tables, tiny_model, tmp_path):
    out = tmp_path / "val"
    r = validate_latency(model=str(tiny_model), tables=[tiny_tables["onnxruntime"], tiny_tables["torch"]], samples=4,
                         passes=3, out=out, progress=False)
    report = json.loads((out / "latency_validation.json").read_text())
    assert (out / "latency_scatter.png").stat().st_size > 10_000 and not (out / "artifacts").exists()
    assert set(report["tables"]) == {"onnxruntime-fp32", "torch-fp32"}
    for t in report["tables"].values():
        for pk in ("prefill.s128", "decode.c128"):
            ph = t["phases"][pk]
            assert ph["n"] == 4 and 0 <= ph["within_10pct"] <= 1 and -1 <= ph["kendall_tau"] <= 1
            assert len(ph["passes_ms"]) == 4 and all(len(x) == 3 and min(x) > 0 for x in ph["passes_ms"])
            assert ph["measured_ms"] == [round(sorted(x)[1], 3) for x in ph["passes_ms"]]  # the median pass
            assert ph["repeatability"]["max_pass_diff"] >= 0
            # the full model, measured in every pass, is the drift reference of the predicted ratios
            ratio = ph["ratio_to_full"]
            runs = sorted(x for row in ratio["full_passes_ms"] for x in row)  # before each of 4 nets, in 3 passes
            assert len(runs) == 12 and ratio["full_measured_ms"] == pytest.approx((runs[5] + runs[6]) / 2, abs=2e-3)
            # each pass's ratio to the full model measured just before it, then the median over passes
            per_net = [sorted(s / f for s, f in zip(sub, full))[1]
                       for sub, full in zip(ph["passes_ms"], ratio["full_passes_ms"])]
            assert ratio["measured"] == pytest.approx(per_net, rel=1e-2)
            errs = [abs(p / ratio["full_predicted_ms"] / m - 1) for p, m in zip(ph["predicted_ms"], per_net)]
            # from the report's times, rounded to 1 us: on a fast CPU the tiny model's ms are small enough for
            # that rounding to move the mean error by 1-2%
            assert ratio["mape"] == pytest.approx(sum(errs) / len(errs), rel=3e-2, abs=3e-3)
            assert 0 <= ratio["within_10pct_between_passes"] <= 1 and -1 <= ratio["kendall_tau"] <= 1
        assert len(t["size"]["artifact_bytes"]) == 4
    assert r["torch-fp32"]["decode.c128"]["n"] == 4 and 0 <= r["torch-fp32"]["decode.c128"]["ratio_within_10pct"] <= 1
    # the torch size model is exact on real checkpoints
    torch_size = report["tables"]["torch-fp32"]["size"]
    assert torch_size["predicted_bytes"] == torch_size["artifact_bytes"]
    # a rerun with the same arguments resumes from the saved measurements; other arguments are refused
    with pytest.raises(HwnasError, match="other arguments"):
        validate_latency(model=str(tiny_model), tables=[tiny_tables["torch"]], samples=4, out=out, progress=False)


def test_validate_latency_of_a_weight_only_int8_table(tiny_model, tmp_path):
    """A precision whose name holds a dash (int8-wo) is built, quantized and measured like the others."""
    from hwnas.profile import profile

    table = profile(model=str(tiny_model), runtime="onnxruntime", precision="int8-wo", calibration=1, warmup=1,
                    repeats=3, prefill=[16], decode=[16], out=tmp_path / "wo.json", progress=False)["table"]
    r = validate_latency(model=str(tiny_model), tables=[table], samples=3, passes=1, out=tmp_path / "v",
                         progress=False)
    assert r["onnxruntime-int8-wo"]["decode.c16"]["n"] == 3 and r["onnxruntime-int8-wo"]["prefill.s16"]["n"] == 3


def test_validate_latency_refuses_a_foreign_table(tiny_tables, tiny_model, tmp_path):
    t = json.loads(tiny_tables["torch"].read_text())
    t["header"]["device"]["id"] = "cpu-elsewhere-neon-t2"
    (tmp_path / "f.json").write_text(json.dumps(t))
    with pytest.raises(HwnasError, match="cpu-elsewhere-neon-t2"):
        validate_latency(model=str(tiny_model), tables=[tmp_path / "f.json"], samples=3, out=tmp_path / "v", progress=False)


def test_validate_latency_cli_rejects_too_few_samples(run_cli, tiny_tables, tiny_model, tmp_path):
    proc = run_cli("validate-latency", "--model", str(tiny_model), "--table", str(tiny_tables["torch"]),
                   "--samples", "2", "--out", str(tmp_path / "v"), check=False)
    assert proc.returncode == 2 and "samples must be at least 3" in proc.stderr
