"""Latency lookup tables: every block a sub-network can use, measured on this device and runtime.

A table holds one entry per block shape and phase, keyed by a readable string:

    attn.q6.kv3/decode.c128   attention block (norm, q/k/v/o, rotary, KV cache) with 6 query heads
    mlp.i1024/prefill.s128    MLP block (norm, gate/up/down) of width 1024 on a 128-token prompt
    embed/decode.c128         token embedding
    head/prefill.s128         final norm and LM head (logits for every prompt position)
    mlp.i1024.dfp32/decode.c128   MLP block whose down_proj stays fp32 (int8 tables offering
                              `"mixed_precision": ["down_proj"]` in their header)

Decoder layers of one model differ only by shape, so each shape is measured once and serves every
layer. A few whole sub-networks are also measured end to end ("calibration"); `predictor.py` fits
the gap between their block sums and their real latency.

torch blocks are timed in-process. onnxruntime and OpenVINO blocks are exported as small graphs,
quantized as the deployed model will be (`quantize.py`), and timed by `runner.py`, the same code an
edge device runs with `python -m hwnas.runner DIR`.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Iterable

from . import runner
from .common import HwnasError, atomic_write_json, home, read_json
from .space import SearchSpace, SubnetConfig

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime", "openvino")
PRECISIONS = {"torch": ("fp32", "fp16", "bf16"), "onnxruntime": ("fp32", "int8", "int8-wo", "int4"),
              "openvino": ("fp32", "int8", "int4")}
PHASES = ("prefill", "decode")
TABLE_FORMAT = "hwnas-latency-table/1"
SIGNATURE_KEYS = ("hidden_size", "head_dim", "vocab_size", "num_hidden_layers", "intermediate_size",
                  "num_attention_heads", "num_key_value_heads")
CALIBRATION_SEED = 10_000  # calibration sub-networks use seeds from here; validation draws elsewhere
ROUNDS = 3  # interleaved measurement rounds; a table keeps the median of the round medians
STACK = 8


def phase_key(phase: str, tokens: int) -> str:
    """`prefill.s128` (a 128-token prompt) or `decode.c128` (one token after 128 cached)."""
    return f"{phase}.{'s' if phase == 'prefill' else 'c'}{tokens}"


@dataclasses.dataclass(frozen=True)
class Block:
    kind: str  # attn | mlp | embed | head
    phase: str
    tokens: int
    heads: int = 0
    kv_heads: int = 0
    width: int = 0
    fp32_down: bool = False  # an MLP block whose down_proj the int8 quantizer leaves fp32

    @property
    def copies(self) -> int:
        """Decoder blocks are timed as a chain of STACK copies with their own weights (and KV caches), as the
        model runs them: the per-call overhead is shared and each copy's weights come from memory."""
        return STACK if self.kind in ("attn", "mlp") else 1

    @property
    def shape_key(self) -> str:
        mlp = f"mlp.i{self.width}" + (".dfp32" if self.fp32_down else "")
        return {"attn": f"attn.q{self.heads}.kv{self.kv_heads}", "mlp": mlp}.get(self.kind, self.kind)

    @property
    def key(self) -> str:
        return f"{self.shape_key}/{phase_key(self.phase, self.tokens)}"


def model_signature(config: dict[str, Any]) -> dict[str, int]:
    """The shape facts a table depends on; a table for another model is refused by comparing these."""
    d = dict(config)
    d.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])
    d.setdefault("num_key_value_heads", d["num_attention_heads"])
    return {k: int(d[k]) for k in SIGNATURE_KEYS}


def blocks_for(space: SearchSpace, phases: dict[str, list[int]], mixed_precision: Iterable[str] = ()) -> list[Block]:
    """Every block a sub-network of `space` can use, in every phase; with `mixed_precision` ["down_proj"],
    also every MLP width with its down_proj kept fp32."""
    heads = sorted({(kv * q, kv) for kv in space.kv_head_choices for q in space.q_per_kv_choices})
    downs = (False, True) if "down_proj" in mixed_precision else (False,)
    out = []
    for phase, lengths in phases.items():
        for t in lengths:
            out += [Block("embed", phase, t), Block("head", phase, t)]
            out += [Block("attn", phase, t, heads=h, kv_heads=kv) for h, kv in heads]
            out += [Block("mlp", phase, t, width=w, fp32_down=d) for d in downs for w in space.mlp_choices]
    return out


def blocks_of(cfg: SubnetConfig, phase: str, tokens: int) -> list[Block]:
    """The blocks sub-network `cfg` runs, one per use (a shape used by 10 layers appears 10 times)."""
    out = [Block("embed", phase, tokens), Block("head", phase, tokens)]
    for h, kv, w, d in zip(cfg.heads, cfg.kv_heads, cfg.mlp, cfg.fp32_down_mask):
        out += [Block("attn", phase, tokens, heads=h, kv_heads=kv), Block("mlp", phase, tokens, width=w, fp32_down=d)]
    return out


def e2e_timing(header: dict[str, Any]) -> tuple[int, int]:
    """(warm-up, timed runs) of one round of an end-to-end measurement for a table with this header.

    Calibration (at profiling) and validation measure whole sub-networks with this one protocol, so
    that the fitted correction and its check see the same kind of figure.
    """
    w, r = header["warmup"], header["repeats"]
    if header["runtime"] == "torch":
        return max(1, w // 3), max(3, r // 6)
    return max(2, w // 2), max(5, r // 3)


def calibration_configs(space: SearchSpace, n: int) -> list[SubnetConfig]:
    """`n` sub-networks spread over the size range: the full model, the smallest, and seeded samples."""
    if n <= 0:
        return []
    out = [space.max_config(), space.min_config()][:n]
    out += [space.sample(CALIBRATION_SEED + i) for i in range(n - len(out))]
    return out


def device_info(device: str, threads: int) -> dict[str, Any]:
    if device == "cpu":
        info = runner.cpu_info()
    elif device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise HwnasError("device 'cuda' asked for, but torch sees no CUDA device")
        info = {"kind": "cuda", "name": torch.cuda.get_device_name(0)}
    else:
        raise HwnasError(f"device {device!r} is not supported; expected cpu or cuda")
    return {**info, "threads": threads, "id": runner.device_id(info, threads)}


def versions(runtime: str) -> dict[str, str]:
    import importlib.metadata as md

    names = {"torch": ["torch", "transformers"], "onnxruntime": ["onnxruntime", "onnx", "torch"],
             "openvino": ["openvino", "nncf", "torch"]}[runtime]
    out = {"python": platform.python_version()}
    for n in names + ["hwnas"]:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            pass
    return out


def mixed_precision(runtime: str, precision: str) -> list[str]:
    """The per-block precision choices a table of `runtime`/`precision` offers: onnxruntime's dynamic int8
    can leave each layer's down_proj fp32 (most of its quality loss, STACK.md)."""
    return ["down_proj"] if (runtime, precision) == ("onnxruntime", "int8") else []


def table_name(model: str, device_id: str, runtime: str, precision: str) -> str:
    return f"{Path(model).name}__{device_id}__{runtime}-{precision}.json"


def shipped_tables_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "latency_tables"


# ------------------------------------------------------------------------------- torch blocks
def _shaped_config(config: Any, **sizes: int):
    import copy

    c = copy.deepcopy(config)
    for k, v in sizes.items():
        setattr(c, k, v)
    return c


def block_module(block: Block, config: Any, *, fused: bool = False):
    """A torch module computing `block` (random weights: latency does not depend on their values); with `fused`, an
    attention block exports as onnxruntime's fused attention, as `export_onnx(fused_attention=True)` writes it."""
    import torch
    from torch import nn
    from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaMLP, LlamaRMSNorm,
                                                          apply_rotary_pos_emb, repeat_kv)

    hidden, eps = config.hidden_size, config.rms_norm_eps
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads

    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(config.vocab_size, hidden)

        def forward(self, input_ids):
            return self.embed(input_ids)

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.lm_head = LlamaRMSNorm(hidden, eps), nn.Linear(hidden, config.vocab_size, bias=False)

        def forward(self, hidden_states):
            return self.lm_head(self.norm(hidden_states))

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c = _shaped_config(config, intermediate_size=block.width)
            self.norms = nn.ModuleList(LlamaRMSNorm(hidden, eps) for _ in range(block.copies))
            self.mlps = nn.ModuleList(LlamaMLP(c) for _ in range(block.copies))

        def forward(self, hidden_states):
            for norm, mlp in zip(self.norms, self.mlps):
                hidden_states = hidden_states + mlp(norm(hidden_states))
            return hidden_states

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c = _shaped_config(config, num_attention_heads=block.heads, num_key_value_heads=block.kv_heads, head_dim=head_dim)
            self.norms = nn.ModuleList(LlamaRMSNorm(hidden, eps) for _ in range(block.copies))
            self.attns = nn.ModuleList(LlamaAttention(c, layer_idx=i) for i in range(block.copies))
            self.groups, self.causal = block.heads // block.kv_heads, block.phase == "prefill"

        def forward(self, hidden_states, cos, sin, *past):
            b, s, _ = hidden_states.shape
            presents = []
            for i, (norm, a) in enumerate(zip(self.norms, self.attns)):
                h = norm(hidden_states)
                q = a.q_proj(h).view(b, s, -1, head_dim).transpose(1, 2)
                k = a.k_proj(h).view(b, s, -1, head_dim).transpose(1, 2)
                v = a.v_proj(h).view(b, s, -1, head_dim).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                k, v = torch.cat([past[2 * i], k], dim=2), torch.cat([past[2 * i + 1], v], dim=2)
                o = torch.nn.functional.scaled_dot_product_attention(
                    q, repeat_kv(k, self.groups), repeat_kv(v, self.groups), is_causal=self.causal)
                hidden_states = hidden_states + a.o_proj(o.transpose(1, 2).reshape(b, s, -1))
                presents += [k, v]
            return (hidden_states, *presents)

    class FusedAttn(Attn):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("cos_cache", torch.rand(config.max_position_embeddings, head_dim // 2))
            self.register_buffer("sin_cache", torch.rand(config.max_position_embeddings, head_dim // 2))

        def forward(self, hidden_states, position_ids, *past):  # static shapes: the mask inputs are constants
            from .fused import attend

            s, total = hidden_states.shape[1], past[0].shape[2] + hidden_states.shape[1]
            seqlens_k, total_t = torch.tensor([total - 1], dtype=torch.int32), torch.tensor(total, dtype=torch.int32)
            bias, presents = torch.zeros(1, 1, s, total), []
            for i, (norm, a) in enumerate(zip(self.norms, self.attns)):
                o, k, v = attend(a, norm(hidden_states), position_ids, past[2 * i], past[2 * i + 1], seqlens_k, total_t,
                                 bias, self.cos_cache, self.sin_cache)
                hidden_states = hidden_states + o
                presents += [k, v]
            return (hidden_states, *presents)

    attn = FusedAttn if fused else Attn
    return {"embed": Embed, "head": Head, "mlp": Mlp, "attn": attn}[block.kind]().eval()


def block_inputs(block: Block, config: Any, *, fused: bool = False) -> dict[str, dict[str, Any]]:
    """Input specs (shape, dtype, fill) for `block`, in the runner's manifest format (`fused`: see `block_module`)."""
    s = block.tokens if block.phase == "prefill" else 1
    past = 0 if block.phase == "prefill" else block.tokens
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden = {"shape": [1, s, config.hidden_size], "dtype": "float32"}
    if block.kind == "embed":
        return {"input_ids": {"shape": [1, s], "dtype": "int64", "fill": "randint", "high": config.vocab_size}}
    if block.kind in ("head", "mlp"):
        return {"hidden_states": hidden}
    kv = {"shape": [1, block.kv_heads, past, head_dim], "dtype": "float32"}
    rot = {"shape": [1, s, head_dim], "dtype": "float32"}
    pasts = {f"past_{kind}_{i}": kv for i in range(block.copies) for kind in ("key", "value")}
    if fused:
        return {"hidden_states": hidden,
                "position_ids": {"shape": [1, s], "dtype": "int64", "fill": "arange", "start": past}, **pasts}
    return {"hidden_states": hidden, "cos": rot, "sin": rot, **pasts}


def export_block_onnx(block: Block, config: Any, path: Path, *, opset: int, module: Any = None,
                      fused: bool = False) -> None:
    """Export `block` (or the given module computing it) as a static-shape ONNX graph at `path`."""
    import torch

    from .export import torch_quiet

    module = module if module is not None else block_module(block, config, fused=fused)
    specs = block_inputs(block, config, fused=fused)
    rng = __import__("numpy").random.default_rng(0)
    args = tuple(torch.from_numpy(runner.make_input(spec, rng).copy()) for spec in specs.values())
    outputs = ["out"] + ([f"present_{kind}_{i}" for i in range(block.copies) for kind in ("key", "value")]
                         if block.kind == "attn" else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with torch.no_grad(), torch_quiet():
        torch.onnx.export(module, args, str(tmp), input_names=list(specs), output_names=outputs, opset_version=opset,
                          dynamo=False, do_constant_folding=True)
    os.replace(tmp, path)


def _torch_feeds(specs: dict[str, dict[str, Any]], device: str, dtype: Any) -> dict[str, Any]:
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    feeds = {}
    for name, spec in specs.items():
        t = torch.from_numpy(runner.make_input(spec, rng).copy()).to(device)
        feeds[name] = t.to(dtype) if t.is_floating_point() else t
    return feeds


def time_torch(fn: Any, *, device: str, warmup: int, repeats: int, before: Any = None) -> dict[str, Any]:
    """Time a torch callable with the runner's method (cache flush on CPU, synchronisation on CUDA)."""
    import torch

    if device == "cuda":
        call = lambda: (fn(), torch.cuda.synchronize())  # noqa: E731
        flush = None
    else:
        call, flush = fn, runner.CacheFlusher()
    with torch.inference_mode():
        samples = runner.time_call(call, warmup=warmup, repeats=repeats, flush=flush, before=before)
    return {**runner.trimmed_stats(samples), "samples_ms": [round(s, 4) for s in samples]}


def measure_torch_block(block: Block, config: Any, *, device: str, dtype: Any, warmup: int, repeats: int) -> dict[str, Any]:
    module = block_module(block, config).to(device=device, dtype=dtype)
    feeds = list(_torch_feeds(block_inputs(block, config), device, dtype).values())
    return per_copy(time_torch(lambda: module(*feeds), device=device, warmup=warmup, repeats=repeats), block.copies)


def per_copy(stats: dict[str, Any], copies: int) -> dict[str, Any]:
    """Timing of a chain of `copies` blocks, as the timing of one."""
    out = {k: (v / copies if k.endswith("_ms") else v) for k, v in stats.items() if k != "samples_ms"}
    return {**out, "copies": copies}


def measure_torch_model(model: Any, phase: str, tokens: int, *, warmup: int, repeats: int) -> dict[str, Any]:
    """End-to-end latency of a torch causal LM: a prompt of `tokens`, or one token after `tokens` cached."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device.type
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens + 1), generator=gen).to(device)
    if phase == "prefill":
        return time_torch(lambda: model(ids[:, :tokens], use_cache=True), device=device, warmup=warmup, repeats=repeats)
    cache = DynamicCache()
    with torch.inference_mode():
        model(ids[:, :tokens], past_key_values=cache, use_cache=True)
    return time_torch(lambda: model(ids[:, tokens:], past_key_values=cache, use_cache=True), device=device,
                      warmup=warmup, repeats=repeats, before=lambda: cache.crop(tokens))


# --------------------------------------------------------------------- deployed (end-to-end) models
def build_deployed(model: Any, runtime: str, precision: str, out: Path, *, isa: str, onnx_fp32: Path | None = None) -> Path:
    """Export an in-memory sub-network as it will be deployed; returns the file the runner loads.

    `onnx_fp32`, an fp32 export of the same sub-network (plain attention), spares a second export when quantizing
    for onnxruntime without fused attention.
    """
    from .export import export_onnx, export_openvino
    from .quantize import compress_openvino, quantize_onnx, settings_for

    out.mkdir(parents=True, exist_ok=True)
    if runtime == "onnxruntime":
        fused = settings_for(runtime, precision, isa).get("fused_attention", False)
        path = onnx_fp32 if onnx_fp32 is not None and precision != "fp32" and not fused \
            else export_onnx(model, out, fused_attention=fused)
        if precision == "fp32":
            return path
        q = out / f"model_{precision}.onnx"
        quantize_onnx(path, q, precision=precision, isa=isa)
        for f in out.glob("model.onnx*"):
            f.unlink()
        return q
    if runtime == "openvino":
        import openvino as ov

        xml = export_openvino(model, out)
        if precision == "fp32":
            return xml
        compressed, _ = compress_openvino(ov.Core().read_model(str(xml)), precision=precision)
        q = out / f"openvino_model_{precision}.xml"
        ov.save_model(compressed, str(q), compress_to_fp16=False)
        for f in out.glob("openvino_model.*"):
            f.unlink()
        return q
    raise HwnasError(f"runtime {runtime!r} has no deployed file format; expected onnxruntime or openvino")


def deployed_inputs(cfg: SubnetConfig, signature: dict[str, int], runtime: str, phase: str, tokens: int) -> dict[str, Any]:
    """A runner item's inputs (and OpenVINO state set-up) for one phase of a deployed causal LM."""
    s, past = (tokens, 0) if phase == "prefill" else (1, tokens)

    def step(n: int, start: int) -> dict[str, Any]:
        d = {"input_ids": {"shape": [1, n], "dtype": "int64", "fill": "randint", "high": signature["vocab_size"]},
             "attention_mask": {"shape": [1, start + n], "dtype": "int64", "fill": "ones"},
             "position_ids": {"shape": [1, n], "dtype": "int64", "fill": "arange", "start": start}}
        if runtime == "openvino":
            d["beam_idx"] = {"shape": [1], "dtype": "int32", "fill": "zeros"}
        return d

    if runtime == "openvino":
        return {"inputs": step(s, past), "stateful": True, **({"stateful_prefill": step(past, 0)} if past else {})}
    inputs = step(s, past)
    for i, kv in enumerate(cfg.kv_heads):
        spec = {"shape": [1, kv, past, signature["head_dim"]], "dtype": "float32", "fill": "normal" if past else "zeros"}
        inputs[f"past_key_values.{i}.key"] = inputs[f"past_key_values.{i}.value"] = spec
    return {"inputs": inputs}


# ------------------------------------------------------------------------------------ profiling
def _check_target(runtime: str, precision: str, device: str, threads: int | None) -> int:
    if runtime not in RUNTIMES:
        raise HwnasError(f"runtime {runtime!r} is not supported; expected one of {list(RUNTIMES)}")
    if precision not in PRECISIONS[runtime]:
        raise HwnasError(f"precision {precision!r} is not available for {runtime}; expected one of {list(PRECISIONS[runtime])}")
    if device not in ("cpu", "cuda"):
        raise HwnasError(f"device {device!r} is not supported; expected cpu or cuda")
    if device == "cpu" and precision in ("fp16", "bf16"):
        raise HwnasError(f"precision {precision} is for --device cuda; on cpu use fp32 (torch) or int8/int4 (onnxruntime, openvino)")
    if threads is not None and threads < 1:
        raise HwnasError(f"threads must be at least 1, got {threads}")
    return threads or os.cpu_count() or 1


def _phases(prefill: Iterable[int], decode: Iterable[int]) -> dict[str, list[int]]:
    phases = {"prefill": sorted({int(t) for t in prefill}), "decode": sorted({int(t) for t in decode})}
    for phase, lengths in phases.items():
        if not lengths or min(lengths) < 1:
            raise HwnasError(f"{phase} lengths must be positive token counts, got {lengths}")
    return phases


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def model_label(model: str, model_dir: Path) -> str:
    from .loading import DEFAULT_MODEL

    return DEFAULT_MODEL if model == DEFAULT_MODEL else model_dir.name


def profile(*, model: str = "smollm2-135m", runtime: str = "onnxruntime", precision: str = "fp32", device: str = "cpu",
            threads: int | None = None, prefill: Iterable[int] = (128,), decode: Iterable[int] = (128,),
            calibration: int = 8, warmup: int = 5, repeats: int = 30, out: str | Path | None = None,
            resume: bool = False, overwrite: bool = False, export_blocks: str | Path | None = None,
            import_measurements: str | Path | None = None, recalibrate: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Measure the latency table of `model` for `runtime`/`precision` on this device; returns a summary.

    With `export_blocks` it only writes the graphs and their manifest, for `python -m hwnas.runner`
    on another device; `import_measurements` turns that folder, once measured, into a table.
    `recalibrate` measures an existing table's calibration sub-networks again (hwnas.recalibrate).
    """
    if recalibrate and (export_blocks is not None or import_measurements is not None or resume or overwrite):
        raise HwnasError("--recalibrate measures an existing table's calibration again; it takes none of "
                         "--export-blocks, --import-measurements, --resume or --overwrite")
    if import_measurements is not None:
        return import_table(Path(import_measurements), out=out, overwrite=overwrite)
    from .loading import read_llama_config, resolve_model

    threads = _check_target(runtime, precision, device, threads)
    if recalibrate:
        from .recalibrate import recalibrate as run_recalibrate

        dev = device_info(device, threads)
        out = Path(out) if out else default_table_path(model_label(model, resolve_model(model)), dev["id"], runtime,
                                                       precision)
        if not out.is_file():
            raise HwnasError(f"no table {out} to recalibrate; profile it first (hwnas profile without --recalibrate)")
        return run_recalibrate(table=out, model=model, progress=progress)
    if warmup < 0 or repeats < 3:
        raise HwnasError(f"need warmup >= 0 and repeats >= 3, got warmup={warmup}, repeats={repeats}")
    if calibration < 0:
        raise HwnasError(f"calibration must be >= 0 sub-networks, got {calibration}")
    phases = _phases(prefill, decode)
    model_dir = resolve_model(model)
    config = read_llama_config(model_dir)
    space = SearchSpace.from_hf_config(config)
    label = model_label(model, model_dir)
    header = {"model": label, "model_signature": model_signature(config),
              "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
              "max_position_embeddings": int(config.get("max_position_embeddings", 0)), "runtime": runtime, "precision": precision,
              "phases": phases, "batch": 1, "warmup": warmup, "repeats": repeats, "trim_percentiles": [5, 95],
              "search_space": space.to_dict(), "versions": versions(runtime)}
    if mixed := mixed_precision(runtime, precision):
        header["mixed_precision"] = mixed
    if runtime == "torch":
        if export_blocks is not None:
            raise HwnasError("--export-blocks writes graphs for onnxruntime or openvino; torch blocks are measured in-process")
        dev = device_info(device, threads)
        header["device"] = dev
        out = Path(out) if out else default_table_path(label, dev["id"], runtime, precision)
        return _profile_torch(model, model_dir, space, header, out, calibration, resume, overwrite, progress)
    if device == "cuda" and runtime == "openvino":
        raise HwnasError("OpenVINO runs on cpu here (its GPU plugin is for Intel GPUs); use --device cpu")
    isa = runner.cpu_info()["isa"]
    if out is not None and Path(out).exists() and not (overwrite or resume) and export_blocks is None:
        raise HwnasError(f"table {out} exists; pass --overwrite to measure again")
    work = Path(export_blocks) if export_blocks is not None else home() / "profile" / Path(
        table_name(label, runner.device_id(runner.cpu_info(), threads) if device == "cpu" else device, runtime, precision)).stem
    manifest = _write_manifest(work, model, model_dir, space, header, config, calibration, threads, isa, resume,
                               overwrite or export_blocks is None and not resume, progress)
    if export_blocks is not None:
        return {"blocks": str(work), "items": len(manifest["items"]),
                "next": [f"python -m hwnas.runner {work}   (on the target device)",
                         f"hwnas profile --import-measurements {work}"]}
    runner.run(work, threads=threads, device=device, progress=progress)
    return import_table(work, out=out, overwrite=True)


def default_table_path(label: str, device_id: str, runtime: str, precision: str) -> Path:
    base = shipped_tables_dir() if shipped_tables_dir().is_dir() else home() / "latency_tables"
    return base / table_name(label, device_id, runtime, precision)


def _start(out: Path, header: dict[str, Any], resume: bool, overwrite: bool) -> dict[str, Any]:
    """The table to continue (`resume`) or a fresh one; refuses to clobber without `overwrite`."""
    if out.exists() and not (resume or overwrite):
        raise HwnasError(f"table {out} exists; pass --resume to continue it or --overwrite to measure again")
    if out.exists() and resume:
        old = read_json(out, "latency table")
        keep = ("model_signature", "runtime", "precision", "phases", "device")
        diff = [k for k in keep if old.get("header", {}).get(k) != header.get(k)]
        if diff:
            raise HwnasError(f"cannot resume {out}: its {', '.join(diff)} differ from this run's")
        return old
    return {"format": TABLE_FORMAT, "header": {**header, "complete": False}, "entries": {}, "calibration": []}


def _profile_torch(model: str, model_dir: Path, space: SearchSpace, header: dict[str, Any], out: Path,
                   calibration: int, resume: bool, overwrite: bool, progress: bool) -> dict[str, Any]:
    import torch
    from tqdm import tqdm
    from transformers import LlamaConfig

    from .supernet import Supernet

    table = _start(out, header, resume, overwrite)
    device, threads = header["device"]["kind"], header["device"]["threads"]
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[header["precision"]]
    if device == "cpu":
        torch.set_num_threads(threads)
    config = LlamaConfig(**{k: v for k, v in read_json(model_dir / "config.json").items() if k != "model_type"})
    w, r = header["warmup"], header["repeats"]
    e2e_w, e2e_r = e2e_timing(header)
    blocks = blocks_for(space, header["phases"])
    cal = calibration_configs(space, calibration)
    # One job per block and per (calibration sub-network, phase); every job is measured in ROUNDS
    # interleaved rounds, and `pending` keeps finished rounds so that --resume loses at most one.
    jobs: list[tuple[str, Any]] = [(b.key, b) for b in blocks]
    jobs += [(f"e2e.{k}/{phase_key(ph, t)}", (cfg, ph, t)) for k, cfg in enumerate(cal)
             for ph, ts in header["phases"].items() for t in ts]
    pending = table.setdefault("pending", {})
    done = set(table["entries"]) | {f"e2e.{c['index']}/{c['phase']}" for c in table["calibration"]}
    sn = subs = None
    with tqdm(total=len(jobs) * ROUNDS, desc="profile torch", unit="run", disable=not progress) as bar:
        bar.update(sum(ROUNDS if key in done else len(pending.get(key, [])) for key, _ in jobs))
        for rnd in range(ROUNDS):
            for key, job in jobs:
                if key in done or len(pending.get(key, [])) > rnd:
                    continue
                bar.set_postfix_str(f"{key} round {rnd + 1}")
                if isinstance(job, Block):
                    stats = measure_torch_block(job, config, device=device, dtype=dtype, warmup=w,
                                                repeats=max(3, r // ROUNDS))
                else:
                    if subs is None:  # channel order does not change latency: skip the importance pass
                        sn = Supernet.from_pretrained(model, dtype={"fp32": "float32", "fp16": "float16",
                                                      "bf16": "bfloat16"}[header["precision"]], device=device,
                                                      calibration=None)
                        subs = {c: sn.extract(c) for c in cal}
                    cfg, ph, t = job
                    stats = measure_torch_model(subs[cfg], ph, t, warmup=e2e_w, repeats=e2e_r)
                pending.setdefault(key, []).append({k: v for k, v in stats.items() if k != "samples_ms"})
                if len(pending[key]) == ROUNDS:
                    merged = _merge_rounds([{"measured": m} for m in pending.pop(key)])
                    if isinstance(job, Block):
                        table["entries"][key] = {**merged["measured"], "copies": job.copies, "rounds": ROUNDS}
                    else:
                        cfg, ph, t = job
                        table["calibration"].append({"config": cfg.to_dict(), "phase": phase_key(ph, t),
                                                     "index": int(key.split("/")[0][4:]), "measured": merged["measured"],
                                                     "rounds_ms": merged["rounds_ms"]})
                atomic_write_json(out, table)
                bar.update(1)
    del sn, subs
    table.pop("pending", None)
    table["header"].update(complete=True, date=datetime.date.today().isoformat())
    atomic_write_json(out, table)
    return {"table": str(out), "entries": len(table["entries"]), "calibration": len(table["calibration"])}


def _block_file(block: Block, runtime: str) -> str:
    return f"blocks/{block.key.replace('/', '__')}.{'onnx' if runtime == 'onnxruntime' else 'xml'}"


def _write_manifest(work: Path, model: str, model_dir: Path, space: SearchSpace, header: dict[str, Any],
                    config_dict: dict[str, Any], calibration: int, threads: int, isa: str, resume: bool,
                    fresh: bool, progress: bool) -> dict[str, Any]:
    """Export (and quantize) every block graph and the calibration sub-networks into `work`, with a manifest."""
    from tqdm import tqdm
    from transformers import LlamaConfig

    from .quantize import settings_for

    runtime, precision = header["runtime"], header["precision"]
    header["quantization"] = settings_for(runtime, precision, isa)
    config = LlamaConfig(**{k: v for k, v in config_dict.items() if k != "model_type"})
    sig = header["model_signature"]
    builds: list[tuple[str, Any]] = []
    block_items = []
    per_round = max(3, header["repeats"] // ROUNDS)
    fused = header["quantization"].get("fused_attention", False)
    for b in blocks_for(space, header["phases"], header.get("mixed_precision", ())):
        block_items.append({"key": b.key, "kind": "block", "file": _block_file(b, runtime), "copies": b.copies,
                            "repeats": per_round, "inputs": block_inputs(b, config, fused=fused)})
        builds.append((block_items[-1]["file"], b))
    e2e_w, e2e_r = e2e_timing(header)
    cal = calibration_configs(space, calibration)
    files = [f"e2e/{k}/" + ("model" if runtime == "onnxruntime" else "openvino_model") +
             ("" if precision == "fp32" else f"_{precision}") + (".onnx" if runtime == "onnxruntime" else ".xml")
             for k in range(len(cal))]
    e2e_items = [{"key": f"e2e.{k}/{phase_key(phase, t)}", "kind": "e2e", "file": files[k], "phase": phase_key(phase, t),
                  "config": cfg.to_dict(), "warmup": e2e_w, "repeats": e2e_r, **deployed_inputs(cfg, sig, runtime, phase, t)}
                 for k, cfg in enumerate(cal) for phase, lengths in header["phases"].items() for t in lengths]
    builds += list(zip(files, cal))
    # Rounds over everything, blocks and whole sub-networks alike: drift of the machine spreads over all of them.
    items = [{**it, "key": f"{it['key']}/r{r}"} for r in range(ROUNDS) for it in block_items + e2e_items]
    manifest = {"format": runner.FORMAT, "runtime": runtime, "precision": precision, "threads": threads,
                "warmup": header["warmup"], "repeats": header["repeats"], "table_header": header, "items": items}
    manifest["digest"] = _digest({k: manifest[k] for k in ("runtime", "precision", "items")})
    old = work / runner.MANIFEST
    if old.is_file():
        prev = runner.read_manifest(work)
        if resume and prev.get("digest") != manifest["digest"]:
            raise HwnasError(f"cannot resume in {work}: its manifest was written for other blocks or settings "
                             f"({prev.get('runtime')}-{prev.get('precision')}); remove it or drop --resume")
        if not resume and not fresh:
            raise HwnasError(f"{work} already holds a block manifest; pass --resume to continue it or choose another folder")
        if not resume:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / runner.MANIFEST, manifest)
    todo = [(f, what) for f, what in builds if not (work / f).is_file()]
    sn = None
    with tqdm(total=len(builds), initial=len(builds) - len(todo), desc=f"export {runtime}-{precision}", unit="graph",
              disable=not progress) as bar:
        for f, what in todo:
            bar.set_postfix_str(f)
            if isinstance(what, Block):
                _build_block(what, config, work / f, runtime, precision, isa, fused=fused)
            else:
                if sn is None:
                    from .supernet import Supernet

                    sn = Supernet.from_pretrained(model, calibration=None)
                tmp = (work / f).parent.with_name(f".{(work / f).parent.name}.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                built = build_deployed(sn.extract(what), runtime, precision, tmp, isa=isa)
                assert built.name == Path(f).name, (built, f)
                shutil.rmtree((work / f).parent, ignore_errors=True)
                os.replace(tmp, (work / f).parent)
            bar.update(1)
    return manifest


def _build_block(block: Block, config: Any, path: Path, runtime: str, precision: str, isa: str, *,
                 fused: bool = False) -> None:
    from .export import torch_quiet
    from .quantize import compress_openvino, quantize_onnx, settings_for

    opset = 21 if runtime == "onnxruntime" and precision == "int4" else 18
    raw = path.with_name(f".{path.stem}.raw.onnx")
    export_block_onnx(block, config, raw, opset=opset, fused=fused)
    try:
        if runtime == "onnxruntime" and (precision == "fp32" or block.kind == "head" and config.tie_word_embeddings
                                         and not settings_for(runtime, precision, isa).get("untie_lm_head")):
            # A tied LM head reaches onnxruntime as a Transpose of the embedding, which the quantizer skips
            # unless it is untied first (int8 does that; int4's MatMulNBits keeps it fp32).
            os.replace(raw, path)
        elif runtime == "onnxruntime":
            tmp = path.with_name(f".{path.name}.tmp.onnx")
            with torch_quiet():
                quantize_onnx(raw, tmp, precision=precision, isa=isa, fp32_down="all" if block.fp32_down else ())
            os.replace(tmp, path)
        else:
            import openvino as ov

            with torch_quiet():
                m, _ = compress_openvino(ov.convert_model(str(raw)), precision=precision)
            tmp = path.with_name(f".{path.stem}.tmp.xml")
            ov.save_model(m, str(tmp), compress_to_fp16=False)
            os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
            os.replace(tmp, path)
    finally:
        raw.unlink(missing_ok=True)


def _merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One calibration point from its interleaved rounds: the median of the round medians."""
    import numpy as np

    med = [r["measured"]["median_ms"] for r in rounds]
    measured = {"mean_ms": float(np.mean(med)), "std_ms": float(np.median([r["measured"]["std_ms"] for r in rounds])),
                "median_ms": float(np.median(med)), "n": sum(r["measured"]["n"] for r in rounds)}
    return {"config": rounds[0].get("config"), "phase": rounds[0].get("phase"), "measured": measured,
            "rounds_ms": [round(m, 4) for m in med]}


def import_table(work: Path, *, out: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Turn a measured block folder (manifest plus the runner's measurements) into a latency table."""
    manifest = runner.read_manifest(work)
    meas_path = work / runner.MEASUREMENTS
    if not meas_path.is_file():
        raise HwnasError(f"{work} has no {runner.MEASUREMENTS}; run `python -m hwnas.runner {work}` on the device first")
    meas = read_json(meas_path, "measurements")
    if meas.get("header", {}).get("manifest_digest") != manifest.get("digest"):
        raise HwnasError(f"{meas_path} was measured for another manifest than {work / runner.MANIFEST}")
    missing = [it["key"] for it in manifest["items"] if it["key"] not in meas.get("items", {})]
    if missing:
        raise HwnasError(f"{len(missing)} items of {work} are not measured yet (first: {missing[:3]}); "
                         f"run `python -m hwnas.runner {work}` again to finish")
    mh = meas["header"]
    header = {**manifest["table_header"], "device": mh["device"], "complete": True,
              "date": datetime.date.today().isoformat(), "cache_flush": mh.get("cache_flush")}
    header["versions"] = {**header.get("versions", {}), mh["runtime"] + "_device": mh["runtime_version"],
                          "python_device": mh["python"]}
    rounds: dict[str, list[dict[str, Any]]] = {}
    for it in manifest["items"]:
        rounds.setdefault(it["key"].rsplit("/r", 1)[0], []).append({**it, "measured": meas["items"][it["key"]]})
    table = {"format": TABLE_FORMAT, "header": header, "entries": {}, "calibration": []}
    for key, rs in rounds.items():
        merged = _merge_rounds(rs)
        if rs[0]["kind"] == "block":
            table["entries"][key] = {**per_copy(merged["measured"], rs[0].get("copies", 1)), "rounds": len(rs)}
        else:
            table["calibration"].append(merged)
    out = Path(out) if out else default_table_path(header["model"], header["device"]["id"], header["runtime"], header["precision"])
    if out.exists() and not overwrite:
        raise HwnasError(f"table {out} exists; pass --overwrite to replace it")
    atomic_write_json(out, table)
    return {"table": str(out), "entries": len(table["entries"]), "calibration": len(table["calibration"]),
            "device": header["device"]["id"]}
