"""Latency-table keys: every block a sub-network can use, and how tables are named and found.

A table holds one entry per block shape and phase, keyed by a readable string:

    attn.q6.kv3/decode.c128   attention block (norm, q/k/v/o, rotary, KV cache) with 6 query heads
    mlp.i1024/prefill.s128    MLP block (norm, gate/up/down) of width 1024 on a 128-token prompt
    embed/decode.c128         token embedding
    head/prefill.s128         final norm and LM head (logits for every prompt position)
    mlp.i1024.dfp32/decode.c128   MLP block whose down_proj stays fp32 (int8 tables offering
                              `"mixed_precision": ["down_proj"]` in their header)

Decoder layers of one model differ only by shape, so each shape is measured once and serves every
layer. A few whole sub-networks are also measured end to end ("calibration"); `predictor.py` fits
the gap between their block sums and their real latency. Measuring is `profile.py`'s job.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Iterable

from .common import HwnasError, home
from .defaults import DEFAULT_MODEL
from .space import SearchSpace, SubnetConfig

RUNTIMES = ("torch", "onnxruntime", "openvino")
PRECISIONS = {"torch": ("fp32", "fp16", "bf16"), "onnxruntime": ("fp32", "int8", "int8-wo", "int4"),
              "openvino": ("fp32", "int8", "int4")}
PHASES = ("prefill", "decode")
TABLE_FORMAT = "hwnas-latency-table/1"
SIGNATURE_KEYS = ("hidden_size", "head_dim", "vocab_size", "num_hidden_layers", "intermediate_size",
                  "num_attention_heads", "num_key_value_heads")
CALIBRATION_SEED = 10_000  # calibration sub-networks use seeds from here; validation draws elsewhere
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
    """The shape facts a table depends on; a table for another model is refused by comparing these.
    Each must be a positive integer (head_dim and num_key_value_heads may be missing or null)."""
    d = {k: v for k, v in dict(config).items() if v is not None}

    def size(k: str) -> int:
        v = d.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise HwnasError(f"model config field {k!r} must be a positive integer, got {v!r}")
        return v

    d.setdefault("head_dim", size("hidden_size") // size("num_attention_heads"))
    d.setdefault("num_key_value_heads", size("num_attention_heads"))
    return {k: size(k) for k in SIGNATURE_KEYS}


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


_SHAPE = re.compile(r"(?:attn\.q(?P<heads>\d+)\.kv(?P<kv>\d+)|mlp\.i(?P<width>\d+)(?P<dfp32>\.dfp32)?)/(?P<phase>.+)")


def monotone_ms(entries: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each entry's median_ms, made non-decreasing in size within its family (MLP blocks of one phase and down_proj
    precision by width; attention blocks of one phase and KV-head count by query heads).

    A wider block does the same work and more, so a narrower one measuring slower is noise (a busy machine, a
    frequency step): the least-squares non-decreasing fit (pool adjacent violators) keeps one outlier from
    steering the search to a shape that is not really faster. Other entries keep their median."""
    out = {k: float(v["median_ms"]) for k, v in entries.items()}
    families: dict[tuple, list[tuple[int, str]]] = {}
    for key in entries:
        m = _SHAPE.fullmatch(key)
        if m and m["width"]:
            families.setdefault(("mlp", m["phase"], bool(m["dfp32"])), []).append((int(m["width"]), key))
        elif m:
            families.setdefault(("attn", m["phase"], int(m["kv"])), []).append((int(m["heads"]), key))
    for members in families.values():
        keys = [k for _, k in sorted(members)]
        pools: list[list[float]] = []  # [sum, count] of each pooled run, left to right
        for k in keys:
            pools.append([out[k], 1.0])
            while len(pools) > 1 and pools[-2][0] / pools[-2][1] > pools[-1][0] / pools[-1][1]:
                s, n = pools.pop()
                pools[-1][0] += s
                pools[-1][1] += n
        fitted = [s / n for s, n in pools for _ in range(int(n))]
        out.update(zip(keys, fitted))
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


def mixed_precision(runtime: str, precision: str) -> list[str]:
    """The per-block precision choices a table of `runtime`/`precision` offers: onnxruntime's dynamic int8
    can leave each layer's down_proj fp32 (most of its quality loss)."""
    return ["down_proj"] if (runtime, precision) == ("onnxruntime", "int8") else []


def model_label(model: str, model_dir: Path) -> str:
    """The model name in a table's header and file name: the default model's name, else its folder's."""
    return DEFAULT_MODEL if model == DEFAULT_MODEL else model_dir.name


def table_name(model: str, device_id: str, runtime: str, precision: str) -> str:
    return f"{Path(model).name}__{device_id}__{runtime}-{precision}.json"


def shipped_tables_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "latency_tables"


def default_table_path(label: str, device_id: str, runtime: str, precision: str) -> Path:
    """Where `hwnas profile` writes a table: the shipped tables' folder in a checkout, else the cache."""
    base = shipped_tables_dir() if shipped_tables_dir().is_dir() else home() / "latency_tables"
    return base / table_name(label, device_id, runtime, precision)


def find_table(model_label: str, device_id: str, runtime: str, precision: str) -> Path | None:
    """The shipped latency table of this model, device, runtime and precision, if there is one."""
    path = shipped_tables_dir() / table_name(model_label, device_id, runtime, precision)
    return path if path.is_file() else None
