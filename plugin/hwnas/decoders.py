"""Each runtime's model as a greedy decoder: `reset()` starts a sequence, `run(ids)` appends tokens and returns the
last position's logits. The benchmark (`hwnas.benchmark`) times these loops in its worker processes.

torch runs with its KV cache (`logits_to_keep=1`, as `generate` does), onnxruntime with its KV cache bound in
place or fed back (`OrtLM`), OpenVINO as a compiled stateful model; llama.cpp and ONNX Runtime GenAI run through
their own loops (`hwnas.llamacpp`, `hwnas.genai`). Nothing here imports torch at import time: the benchmark's
onnxruntime and OpenVINO workers measure their runtime's memory alone.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from . import runner
from .common import HwnasError
from .fused import FUSED_KEY
from .genai import GenAILM
from .llamacpp import LlamaCppLM
from .loading import load_model


def torch_weights_read(model: Any) -> int:
    """Parameter bytes one decode step reads (bitsandbytes scales included); an untied embedding costs one row."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = 0
    for p in model.parameters():
        n = p.numel() * p.element_size()
        total += n // p.shape[0] if p is emb and p is not head else n
        state = getattr(p, "quant_state", None)  # 4-bit: per-block absmax
        scales = [getattr(p, "SCB", None), getattr(state, "absmax", None)]
        total += sum(s.numel() * s.element_size() for s in scales if s is not None)
    return total


def model_config(path: Path) -> dict[str, Any]:
    folder = path if path.is_dir() else path.parent
    return json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}


class TorchLM:
    def __init__(self, path: Path, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        quant = (model_config(path).get("quantization_config") or {}).get("quant_method")
        if quant == "bitsandbytes":  # placed by from_pretrained; `.to()` is refused for 8-bit models
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu").eval()
        else:
            self.model = load_model(path, allow_subnet=True)[0]
        self.vocab, self.torch = self.model.config.vocab_size, torch
        self.info = {"weights_read_bytes": torch_weights_read(self.model), "dtype": str(self.model.dtype),
                     "quantization": quant, "torch_threads": torch.get_num_threads()}

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()

    def run(self, ids: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.from_numpy(ids), past_key_values=self.cache, use_cache=True,
                             logits_to_keep=1)
        return out.logits[0, -1].float().numpy()


class OrtLM:
    """An Optimum ONNX decoder. With `context` and onnxruntime's fused attention (`hwnas.fused`), the KV cache is
    one buffer of `context` slots per layer, bound as each step's past and present alike (as onnxruntime-genai
    binds it), so that no step copies the cache; otherwise each step's present tensors are fed back as its past."""

    def __init__(self, path: Path, threads: int, context: int | None = None) -> None:
        import onnxruntime as ort

        self.sess = runner.ort_session(path, threads)
        ins = {i.name: i for i in self.sess.get_inputs()}
        self.outputs = [o.name for o in self.sess.get_outputs()]
        cfg = model_config(path)
        # A dynamic KV-head axis (heterogeneous sub-networks) only sizes the empty first cache, which Concat skips.
        dim = lambda d, key: d if isinstance(d, int) else cfg.get(key, 1)  # noqa: E731
        dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        self.empty = {n: np.zeros((1, dim(i.shape[1], "num_key_value_heads"), 0, dim(i.shape[3], "head_dim")),
                                  dtypes[i.type]) for n, i in ins.items() if n.startswith("past_key_values.")}
        self.present = {p: "present" + p[len("past_key_values"):] for p in self.empty}  # each past's output
        self.position = "position_ids" in ins
        last = self.sess.get_outputs()[0].shape[-1]
        self.vocab = last if isinstance(last, int) else cfg["vocab_size"]
        if context is not None and context < 1:
            raise HwnasError(f"context {context} cannot hold a token; expected at least 1")
        # the exporter marks the config of a graph with GroupQueryAttention (reading the graph would add its weights
        # to the worker's peak memory)
        self.context = context if context and cfg.get(FUSED_KEY) else None
        self.info = {"intra_op_threads": threads,
                     "kv_cache": f"shared past/present buffer of {self.context} slots" if self.context else "fed back"}
        self.ortvalue = ort.OrtValue.ortvalue_from_numpy  # wraps an array without a copy

    def reset(self) -> None:
        self.kv, self.pos, self.binding = {k: self.ortvalue(v) for k, v in self.empty.items()}, 0, None

    def run(self, ids: np.ndarray) -> np.ndarray:
        n = ids.shape[1]
        if self.context is not None and self.pos + n > self.context:
            raise HwnasError(f"{self.pos + n} tokens do not fit the KV cache of {self.context} slots; expected at "
                             f"most {self.context} (the prompt plus new tokens)")
        if self.binding is not None:
            return self._run_shared(ids)
        # the KV cache stays in onnxruntime's OrtValues from step to step (no copy out to numpy and back)
        out = dict(zip(self.outputs, self.sess.run_with_ort_values(self.outputs, {
            **{k: self.ortvalue(v) for k, v in self._feeds(ids).items()}, **self.kv})))
        presents = {p: out[self.present[p]] for p in self.empty}
        if self.context is None:
            self.kv = presents
        else:  # the first step sizes each layer's buffer (per-layer KV heads) and fills its first slots
            self.binding, self.buffers = self.sess.io_binding(), {}
            for p, present in presents.items():
                value = present.numpy()
                buffer = np.zeros((*value.shape[:2], self.context, value.shape[3]), value.dtype)
                buffer[:, :, :value.shape[2]] = value
                self.buffers[p] = buffer  # owns the memory the OrtValue wraps
                slot = self.ortvalue(buffer)
                self.binding.bind_ortvalue_input(p, slot)
                self.binding.bind_ortvalue_output(self.present[p], slot)
            self.binding.bind_output("logits")
        self.pos += n
        return out["logits"].numpy()[0, -1]

    def _feeds(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        n = ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, self.pos + n), np.int64)}
        if self.position:
            feeds["position_ids"] = np.arange(self.pos, self.pos + n, dtype=np.int64)[None]
        return feeds

    def _run_shared(self, ids: np.ndarray) -> np.ndarray:
        # GroupQueryAttention writes the new keys and values into slots pos.. of the bound buffers in place
        feeds = self._feeds(ids)  # bound by address: kept alive until the run is done
        for name, value in feeds.items():
            self.binding.bind_cpu_input(name, value)
        self.sess.run_with_iobinding(self.binding)
        self.pos += ids.shape[1]
        return self.binding.get_outputs()[-1].numpy()[0, -1]


class OpenVinoLM:
    def __init__(self, path: Path, threads: int) -> None:
        self.req = runner.ov_request(path, threads)
        self.inputs = {p.get_any_name() for p in self.req.model_inputs}
        compiled = self.req.get_compiled_model()
        last = compiled.output("logits").get_partial_shape()[-1]
        self.vocab = last.get_length() if last.is_static else model_config(path)["vocab_size"]
        self.info = {k.lower(): getattr(v, "to_string", v.__str__)() for k in
                     ("INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION", "PERFORMANCE_HINT")
                     for v in [compiled.get_property(k)]}

    def reset(self) -> None:
        self.req.reset_state()
        self.pos = 0

    def run(self, ids: np.ndarray) -> np.ndarray:
        n = ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, self.pos + n), np.int64),
                 "position_ids": np.arange(self.pos, self.pos + n, dtype=np.int64)[None], "beam_idx": np.zeros(1, np.int32)}
        self.req.start_async({k: v for k, v in feeds.items() if k in self.inputs}, share_inputs=True)
        self.req.wait()
        self.pos += n
        return self.req.get_tensor("logits").data[0, -1].copy()


LOADERS = {"torch": TorchLM, "onnxruntime": OrtLM, "openvino": OpenVinoLM, "llamacpp": LlamaCppLM, "ortgenai": GenAILM}
SIZED = ("onnxruntime", "llamacpp", "ortgenai")  # their loaders size the KV cache (context) up front
