"""hwnas benchmark on the tiny Llama as torch, ONNX and OpenVINO. No test asserts on speed."""
import json
from pathlib import Path

import pytest

from hwnas.benchmark import benchmark, locate, prompt_ids
from hwnas.common import HwnasError

PROMPT, NEW = 12, 5
FAST = ("--prompt-tokens", str(PROMPT), "--new-tokens", str(NEW), "--threads", "1", "--repeats", "2", "--rounds", "2")


@pytest.fixture(scope="module")
def deployed(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model as a torch checkpoint, an Optimum ONNX folder and an OpenVINO IR folder."""
    from hwnas.export import export_onnx, export_openvino
    from hwnas.loading import load_model

    d = tmp_path_factory.mktemp("deployed")
    model, _ = load_model(tiny_model)
    export_onnx(model, d / "onnx")
    export_openvino(model, d / "openvino")
    return {"torch": tiny_model, "onnxruntime": d / "onnx", "openvino": d / "openvino"}


def test_compare_torch_onnx_openvino_in_one_run(run_cli, deployed, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("benchmark", "--model", str(deployed["torch"]), "--compare", str(deployed["onnxruntime"]),
                   str(deployed["openvino"]), *FAST, "--out", str(out))
    report = json.loads(out.read_text())
    table = report["markdown"]
    assert table in proc.stderr and json.loads(proc.stdout)["out"] == str(out)  # stdout: the JSON only
    assert (tmp_path / "bench.md").read_text() == table
    assert sum(line.startswith("|") for line in table.splitlines()) == 2 + 3  # header, rule, a row a model
    assert report["device"]["threads"] == 1 and report["versions"]["onnxruntime"] and report["versions"]["openvino"]
    assert report["settings"]["rounds"] == 2 and report["memory_bandwidth"]["gb_per_s"] > 0
    models = report["models"]
    assert [m["runtime"] for m in models] == ["torch", "onnxruntime", "openvino"]
    assert report["reference"] == models[0]["label"]
    for m in models:
        for key in ("prefill_ms", "ttft_ms", "decode_ms_per_token"):
            assert m[key]["median"] > 0 and len(m[key]["round_medians"]) == 2 and m[key]["spread"] >= 0
        assert m["ttft_ms"]["median"] >= m["prefill_ms"]["median"] * 0.5
        for key in ("tokens_per_s", "peak_rss_bytes", "file_bytes", "weights_read_bytes", "decode_floor_ms",
                    "decode_vs_floor"):
            assert m[key] > 0, key
        assert set(m["ratios"]) >= {"prefill_ms", "decode_ms_per_token", "tokens_per_s", "peak_rss_bytes", "file_bytes"}
        assert len(m["greedy_tokens"]) == NEW and m["greedy_tokens_repeatable"]
        assert m["label"] in table
    assert all(v == 1 for v in models[0]["ratios"].values())
    # the same fp32 weights, counted from three formats; an untied-looking ONNX export still reads one LM head
    reads = [m["weights_read_bytes"] for m in models]
    assert max(reads) / min(reads) < 1.01
    assert models[1]["greedy_tokens"] == models[0]["greedy_tokens"]


def test_runtime_is_read_from_the_folder(deployed):
    for runtime, path in deployed.items():
        assert locate(path)[0] == runtime
    assert locate(deployed["onnxruntime"] / "model.onnx") == ("onnxruntime", deployed["onnxruntime"] / "model.onnx")
    assert locate(deployed["openvino"])[1].name == "openvino_model.xml"


def test_runtime_errors_name_what_was_found(deployed, tmp_path, run_cli):
    with pytest.raises(HwnasError, match=r"--runtime torch does not fit .*ONNX model .*model\.onnx"):
        benchmark([deployed["onnxruntime"]], runtime="torch")
    with pytest.raises(HwnasError, match=r"--runtime onnxruntime does not fit .*OpenVINO IR"):
        benchmark([deployed["openvino"]], runtime="onnxruntime")
    with pytest.raises(HwnasError, match="runtime 'tensorrt' is not known; expected one of torch, onnxruntime, openvino"):
        benchmark([deployed["torch"]], runtime="tensorrt")
    with pytest.raises(HwnasError, match="does not exist"):
        benchmark([tmp_path / "missing"])
    with pytest.raises(HwnasError, match="holds no model to benchmark"):
        benchmark([tmp_path])
    with pytest.raises(HwnasError, match="new_tokens must be at least 2"):
        benchmark([deployed["torch"]], new_tokens=1)
    proc = run_cli("benchmark", "--model", str(deployed["openvino"]), "--runtime", "torch", "--out",
                   str(tmp_path / "x.json"), check=False)
    assert proc.returncode == 2 and "OpenVINO IR (*.xml + *.bin): openvino_model.xml" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_onnxruntime_decode_loop_gives_torch_greedy_tokens(deployed, tmp_path):
    """The KV cache really is fed back: ORT's tokens are those of torch recomputing the whole sequence each step."""
    import torch
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from hwnas.loading import load_model

    model, _ = load_model(deployed["torch"])
    ids = torch.from_numpy(prompt_ids(model.config.vocab_size, PROMPT))
    expected = []
    with torch.no_grad():
        for _ in range(NEW):
            expected.append(int(model(ids, use_cache=False).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[expected[-1]]])], dim=1)
    # a bitsandbytes 8-bit checkpoint runs through the same torch path
    q = LlamaForCausalLM.from_pretrained(deployed["torch"], quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                         device_map="cpu")
    q.save_pretrained(tmp_path / "int8")
    report = benchmark([deployed["onnxruntime"], tmp_path / "int8"], prompt_tokens=PROMPT, new_tokens=NEW, threads=1,
                       repeats=1, rounds=1, warmup=0, progress=False)
    ort, bnb = report["models"]
    assert ort["greedy_tokens"] == expected
    assert bnb["runtime"] == "torch" and bnb["runtime_info"]["quantization"] == "bitsandbytes"
    assert len(bnb["greedy_tokens"]) == NEW and bnb["weights_read_bytes"] < 0.5 * ort["weights_read_bytes"]


def test_weights_read_counts_an_embedding_lookup_as_one_row():
    """A table only looked up (Gather, GatherBlockQuantized blocks and scales) costs one row a token; shared with
    the LM head's MatMul (a tied head, as GenAI's int4 build ties it) it is read whole."""
    from hwnas.benchmark import weights_read

    consts = {"emb_q": (1000, 10), "emb_s": (100, 10), "head_q": (500, 10), "w": (64, 4)}
    own_head = [("GatherBlockQuantized", ["emb_q", "ids", "emb_s"], ["h"]), ("MatMul", ["h", "w"], ["x"]),
                ("MatMulNBits", ["x", "head_q", "head_s"], ["logits"])]
    assert weights_read(consts, own_head) == 100 + 10 + 64 + 500
    tied = [("GatherBlockQuantized", ["emb_q", "ids", "emb_s"], ["h"]), ("MatMul", ["h", "w"], ["x"]),
            ("MatMulNBits", ["x", "emb_q", "emb_s"], ["logits"])]
    assert weights_read(consts, tied) == 1000 + 100 + 64
