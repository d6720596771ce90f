"""Latency and size of a sub-network, predicted from a latency table.

    p = LatencyPredictor.load("latency_tables/smollm2-135m__cpu-...__onnxruntime-int8.json")
    p.latency_ms(cfg, "decode")      # block sum plus the fitted correction
    p.bytes(cfg)                     # weight bytes at the table's runtime and precision

The block sum counts each block a sub-network runs (embedding, LM head, one attention and one MLP
block per kept layer), with block times made non-decreasing in block size (`tables.monotone_ms`).
What the sum misses is fitted on the table's calibration sub-networks, which were measured end to end
when the table was made: per phase, the form among `sum`,
`a * sum`, `a * sum + c` and `a * sum + b * layers + c` with the lowest leave-one-out error on
those points (a richer form must earn its parameters on points it did not see). The chosen form,
its leave-one-out error and its residuals are kept with the predictor for a reader to check.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path
from typing import Any

from .common import HwnasError, read_json
from .tables import PHASES, SIGNATURE_KEYS, TABLE_FORMAT, blocks_of, monotone_ms, phase_key
from .space import SubnetConfig

logger = logging.getLogger(__name__)
_STAT_KEYS = ("mean_ms", "std_ms", "median_ms", "n")


@dataclasses.dataclass(frozen=True)
class Correction:
    """`measured = scale * block_sum + per_layer_ms * layers + offset_ms`, fitted on `n` sub-networks."""

    scale: float = 1.0
    per_layer_ms: float = 0.0
    offset_ms: float = 0.0
    n: int = 0
    max_abs_residual_pct: float = 0.0
    form: str = "sum"
    loo_error_pct: float = 0.0

    def __call__(self, block_sum: float, layers: int) -> float:
        return self.scale * block_sum + self.per_layer_ms * layers + self.offset_ms


def _check_stats(where: str, stats: Any) -> None:
    if not isinstance(stats, dict):
        raise HwnasError(f"{where}: expected an object with {list(_STAT_KEYS)}, got {type(stats).__name__}")
    for k in _STAT_KEYS:
        v = stats.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v) or v < 0:
            raise HwnasError(f"{where}: {k} must be a non-negative number, got {_short(v)}")


def _finite(v: int | float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        return False


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _positive_int(v: Any) -> bool:
    return type(v) is int and v > 0


# header field -> (its check, what was expected); the required ones first, then those some tables lack
_HEADER = {
    "model": (lambda v: isinstance(v, str), "a string"),
    "model_signature": (lambda v: isinstance(v, dict) and all(_positive_int(v.get(k)) for k in SIGNATURE_KEYS),
                        f"an object of positive integers {list(SIGNATURE_KEYS)}"),
    "runtime": (lambda v: isinstance(v, str), "a string"),
    "precision": (lambda v: isinstance(v, str), "a string"),
    "device": (lambda v: isinstance(v, dict) and isinstance(v.get("id"), str)
               and isinstance(v.get("kind", ""), str), "an object with a string 'id'"),
    "phases": (lambda v: isinstance(v, dict) and set(v) <= set(PHASES) and all(
        isinstance(ts, list) and ts and all(_positive_int(t) for t in ts) for ts in v.values()),
               f"an object mapping {list(PHASES)} to lists of positive token counts"),
    "quantization": (lambda v: isinstance(v, dict), "an object"),
    "mixed_precision": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "tie_word_embeddings": (lambda v: isinstance(v, bool), "true or false"),
    "max_position_embeddings": (_positive_int, "a positive integer"),
    "warmup": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
    "repeats": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
}
_CAL_PHASE = re.compile(r"prefill\.s[0-9]{1,9}|decode\.c[0-9]{1,9}")  # as tables.phase_key writes them


def _check_header(where: str, header: dict[str, Any]) -> None:
    for k, (ok, expected) in _HEADER.items():
        if k in header and not ok(header[k]):
            raise HwnasError(f"{where}: header {k} is {_short(header[k])}; expected {expected}")


class LatencyTable:
    """A latency table file, checked for format, types and completeness when loaded."""

    def __init__(self, data: dict[str, Any], path: Path | None = None) -> None:
        where = str(path or "latency table")
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise HwnasError(f"{where} is not an hwnas latency table (expected format {TABLE_FORMAT!r})")
        header, entries, cal = data.get("header"), data.get("entries"), data.get("calibration", [])
        if not isinstance(header, dict) or not isinstance(entries, dict) or not isinstance(cal, list):
            raise HwnasError(f"{where}: expected 'header' and 'entries' objects and a 'calibration' list")
        for k in ("model", "model_signature", "runtime", "precision", "device", "phases"):
            if k not in header:
                raise HwnasError(f"{where}: header has no {k!r}")
        if not header.get("complete"):
            raise HwnasError(f"{where} is a partial table (profiling stopped); finish it with `hwnas profile --resume`")
        _check_header(where, header)
        for key, stats in entries.items():
            _check_stats(f"{where}: entry {key!r}", stats)
        for i, c in enumerate(cal):
            if not isinstance(c, dict) or not isinstance(c.get("phase"), str):
                raise HwnasError(f"{where}: calibration[{i}] needs 'config', 'phase' and 'measured'")
            if not _CAL_PHASE.fullmatch(c["phase"]):
                raise HwnasError(f"{where}: calibration[{i}].phase is {_short(c['phase'])}; expected prefill.sN or "
                                 "decode.cN")
            _check_stats(f"{where}: calibration[{i}].measured", c.get("measured"))
            if not c["measured"]["median_ms"] > 0:  # the correction's errors are relative to it
                raise HwnasError(f"{where}: calibration[{i}].measured.median_ms is 0; expected a positive time")
            try:
                SubnetConfig.from_dict(c.get("config") or {})
            except (HwnasError, TypeError, KeyError) as e:
                raise HwnasError(f"{where}: calibration[{i}].config is not a sub-network config: {e}") from None
        self.path, self.header, self.entries, self.calibration = path, header, entries, cal

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        try:
            data = read_json(path, "latency table")
        except HwnasError:
            raise
        except (ValueError, RecursionError, OSError) as e:  # json's digit limit, deep nesting, unreadable files
            raise HwnasError(f"latency table {path} is not readable JSON: {' '.join(str(e).split())[:120]}") from None
        return cls(data, Path(path))

    @property
    def runtime(self) -> str:
        return self.header["runtime"]

    @property
    def precision(self) -> str:
        return self.header["precision"]

    @property
    def device_id(self) -> str:
        return self.header["device"]["id"]

    @property
    def mixed_precision(self) -> list[str]:
        """Per-block precision choices the table holds entries for (["down_proj"]: `mlp.i<W>.dfp32` blocks)."""
        return list(self.header.get("mixed_precision", []))

    def default_tokens(self, phase: str) -> int:
        if phase not in PHASES:
            raise HwnasError(f"phase {phase!r} is not known; expected one of {list(PHASES)}")
        if phase not in self.header["phases"]:
            raise HwnasError(f"{self.path} has no {phase} lengths; expected a table profiled for {phase}")
        return self.header["phases"][phase][0]

    def check_model(self, signature: dict[str, int]) -> None:
        mine = self.header["model_signature"]
        diff = {k: (mine.get(k), v) for k, v in signature.items() if mine.get(k) != v}
        if diff:
            raise HwnasError(f"{self.path} was measured for model {self.header['model']!r}, whose shape differs: "
                             + ", ".join(f"{k} {a} in the table vs {b}" for k, (a, b) in diff.items()))

    def check_target(self, *, runtime: str | None = None, precision: str | None = None, device_id: str | None = None,
                     allow_foreign: bool = False) -> None:
        """Refuse a table measured for another runtime, precision or device than the one asked for."""
        asked = {"runtime": runtime, "precision": precision, "device": device_id}
        have = {"runtime": self.runtime, "precision": self.precision, "device": self.device_id}
        diff = [f"{k}: table {have[k]!r}, asked {v!r}" for k, v in asked.items() if v is not None and v != have[k]]
        if diff and not allow_foreign:
            raise HwnasError(f"{self.path} does not match the target ({'; '.join(diff)}); "
                             "profile this target or pass --allow-foreign-table")


def check_table(table: Path, *, signature: dict[str, int], runtime: str, precision: str, device_id: str,
                quantization: dict[str, Any]) -> dict[str, Any]:
    """Refuse a table that does not describe this deployment: model shape, runtime, precision, device, and the
    `quantization` settings this device deploys with (`quantize.settings_for`); returns the table's header."""
    t = LatencyTable.load(table)
    t.check_model(signature)
    t.check_target(runtime=runtime, precision=precision, device_id=device_id)
    have = t.header.get("quantization", {})
    if have != quantization:
        raise HwnasError(f"{table} was measured with quantization {have}, but this device deploys {quantization}; "
                         "profile again (hwnas profile) so that the table describes the deployed model")
    return t.header


class LatencyPredictor:
    def __init__(self, table: LatencyTable) -> None:
        self.table = table
        self.ms = monotone_ms(table.entries)  # block times the sums use: non-decreasing in block size
        raw = {k: float(v["median_ms"]) for k, v in table.entries.items()}
        moved = {k: v / raw[k] for k, v in self.ms.items() if raw[k] > 0 and abs(v / raw[k] - 1) > 0.25}
        if moved:
            worst = max(moved, key=lambda k: abs(moved[k] - 1))
            logger.warning("%s: %d block times are out of order with their size by more than 25%% (worst %s, x%.2f to "
                           "keep larger blocks no faster); the table was likely profiled on a busy machine: consider "
                           "`hwnas profile --overwrite` on a quiet one", table.path or "latency table", len(moved),
                           worst, moved[worst])
        self.corrections = {pk: self._fit(pk) for pk in {c["phase"] for c in table.calibration}}

    @classmethod
    def load(cls, path: str | Path) -> "LatencyPredictor":
        return cls(LatencyTable.load(path))

    def missing(self, cfg: SubnetConfig, phase: str, tokens: int | None = None) -> list[str]:
        tokens = tokens or self.table.default_tokens(phase)
        return sorted({b.key for b in blocks_of(cfg, phase, tokens)} - set(self.table.entries))

    def block_sum(self, cfg: SubnetConfig, phase: str = "decode", tokens: int | None = None) -> float:
        tokens = tokens or self.table.default_tokens(phase)
        missing = self.missing(cfg, phase, tokens)
        if missing:
            raise HwnasError(f"{self.table.path} lacks {len(missing)} entries this sub-network needs: {missing}")
        return sum(self.ms[b.key] for b in blocks_of(cfg, phase, tokens))

    def latency_ms(self, cfg: SubnetConfig, phase: str = "decode", tokens: int | None = None) -> float:
        """Predicted latency of one forward pass: a prompt of `tokens` (prefill) or one token after `tokens` (decode)."""
        tokens = tokens or self.table.default_tokens(phase)
        s = self.block_sum(cfg, phase, tokens)
        corr = self.corrections.get(phase_key(phase, tokens))
        return corr(s, cfg.depth) if corr else s

    def bytes(self, cfg: SubnetConfig, precision: str | None = None) -> int:
        """Weight bytes of `cfg` deployed at the table's runtime and `precision` (default: the table's)."""
        h = self.table.header
        # a tied head that the quantizer gave its own weight (onnx_graph.untie_lm_head) is stored twice; the table's
        # deployment settings describe its own precision only
        q = h.get("quantization", {}) if precision in (None, h["precision"]) else {}
        tied = h.get("tie_word_embeddings", False) and not q.get("untie_lm_head", False)
        embedding = ("blocks-shared" if h.get("tie_word_embeddings", False) else "blocks") \
            if q.get("shared_embedding") else "int8-rows" if q.get("quantize_embedding") else "auto"
        rotary = 0
        if q.get("fused_attention"):
            if "max_position_embeddings" not in h:
                raise HwnasError(f"table {self.table.path} deploys fused attention but its header lacks "
                                 "max_position_embeddings (the rotary cache's rows); profile it again")
            rotary = h["max_position_embeddings"]
        return size_bytes(cfg, h["model_signature"], runtime=h["runtime"], precision=precision or h["precision"],
                          tied=tied, embedding=embedding, rotary_positions=rotary, block=q.get("block_size"),
                          head_bits=q.get("head_bits"))

    def _fit(self, pk: str) -> Correction:
        """The correction form (none, scale, affine, affine plus a per-layer term) with the lowest
        leave-one-out error on the calibration points, refitted on all of them."""
        import numpy as np

        pts = [c for c in self.table.calibration if c["phase"] == pk]
        if len(pts) < 3:
            return Correction(n=len(pts))
        phase, tokens = pk.split(".")[0], int(pk.split(".")[1][1:])
        cfgs = [SubnetConfig.from_dict(c["config"]) for c in pts]
        sums = np.array([self.block_sum(c, phase, tokens) for c in cfgs])
        depth = np.array([c.depth for c in cfgs], dtype=float)
        y = np.array([c["measured"]["median_ms"] for c in pts], dtype=float)
        if not np.isfinite(sums).all():
            raise HwnasError(f"{self.table.path}: the block sums of the {pk} calibration sub-networks overflow; "
                             "expected finite entry times")
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # huge but finite times overflow: refused below
                c = self._best_form(sums, depth, y)
        except np.linalg.LinAlgError:
            c = None
        if c is None or not all(map(math.isfinite, (c.scale, c.per_layer_ms, c.offset_ms, c.loo_error_pct))):
            raise HwnasError(f"{self.table.path}: cannot fit the {pk} correction to its calibration sub-networks; "
                             "expected plausible calibration and entry times")
        return c

    @staticmethod
    def _best_form(sums: Any, depth: Any, y: Any) -> Correction:
        """The form with the lowest leave-one-out error on points (block sum, layers, measured), refitted on all."""
        import numpy as np

        n = len(y)
        one = np.ones_like(sums)
        forms = {"sum": None, "scale": [sums], "affine": [sums, one], "affine+layers": [sums, depth, one]}
        best = None
        for name, cols in forms.items():
            if cols is not None and n <= len(cols) + 1:
                continue
            X = None if cols is None else np.stack(cols, 1)
            errs = []
            for i in range(n):
                if X is None:
                    pred = sums[i]
                else:
                    keep = np.arange(n) != i
                    pred = X[i] @ np.linalg.lstsq(X[keep], y[keep], rcond=None)[0]
                errs.append(abs(pred - y[i]) / y[i])
            loo = float(np.mean(errs))
            if best is None or loo < best[0] - 1e-9:
                best = (loo, name, X)
        loo, name, X = best
        coef = np.linalg.lstsq(X, y, rcond=None)[0] if X is not None else np.array([1.0])
        if name in ("sum", "scale"):
            full = (coef[0], 0.0, 0.0)
        elif name == "affine":
            full = (coef[0], 0.0, coef[1])
        else:
            full = tuple(coef)
        pred = full[0] * sums + full[1] * depth + full[2]
        return Correction(float(full[0]), float(full[1]), float(full[2]), n,
                          float(np.max(np.abs(pred - y) / y) * 100), name, loo * 100)


def linear_shapes(cfg: SubnetConfig, sig: dict[str, int]) -> list[tuple[int, int, bool]]:
    """(out, in, kept fp32) of every linear layer of the decoder layers of `cfg` (a down_proj marked in `fp32_down`)."""
    hd, hidden = sig["head_dim"], sig["hidden_size"]
    out = []
    for h, kv, w, fp32 in zip(cfg.heads, cfg.kv_heads, cfg.mlp, cfg.fp32_down_mask):
        out += [(h * hd, hidden, False), (kv * hd, hidden, False), (kv * hd, hidden, False), (hidden, h * hd, False)]
        out += [(w, hidden, False), (w, hidden, False), (hidden, w, fp32)]
    return out


def _matrix_bytes(rows: int, cols: int, runtime: str, precision: str, block: int | None = None) -> float:
    n = rows * cols
    if precision == "fp32":
        return 4 * n
    if precision in ("fp16", "bf16"):
        return 2 * n
    if precision == "int8":  # per-output-channel scale and zero point
        return n + rows * (5 if runtime == "onnxruntime" else 3)
    if precision == "int8-wo":  # ORT MatMulNBits: symmetric blocks (64) along the input (padded), fp32 scales
        b = block or 64
        return rows * -(-cols // b) * (b + 4)
    if precision == "int4" and runtime == "onnxruntime":  # MatMulNBits: symmetric blocks (32), fp32 scales
        b = block or 32
        return rows * -(-cols // b) * (b / 2 + 4)
    if precision == "int4":  # NNCF: groups of 64, f16 scale, u4 zero point
        return n / 2 + n / 64 * 2.5
    raise HwnasError(f"precision {precision!r} has no size model; expected fp32, fp16, bf16, int8, int8-wo or int4")


def size_bytes(cfg: SubnetConfig, sig: dict[str, int], *, runtime: str, precision: str, tied: bool,
               embedding: str = "auto", rotary_positions: int = 0, block: int | None = None,
               head_bits: int | None = None) -> int:
    """Weight bytes of a deployed sub-network, following what each runtime's quantizer touches.

    The embedding (onnxruntime; `embedding`): "auto" keeps it in fp32 when quantizing (dynamic quantization touches
    MatMuls only); "int8-rows", int8 with a scale per row (hwnas's dynamic int8); "blocks", int8 blocks of 64 with
    fp32 scales (int8-wo); "blocks-shared", the LM head's blocks, so only a copy of their scales (int8-wo, tied model;
    with a 4-bit head, `head_bits` 4, not even that).
    The LM head is stored with the embedding when `tied` (and not untied by the quantizer). The down_proj of layers
    marked in `cfg.fp32_down` stays fp32 in dynamic int8. NNCF compresses the embedding too, and keeps the LM head in
    int8 in int4 mode. Fused attention (hwnas.fused) adds fp32 rotary cos and sin caches of `rotary_positions` rows.
    `block` is MatMulNBits' block size (int8-wo, onnxruntime int4), `head_bits` 8 an onnxruntime int4 model's int8
    LM head; the embedding's int8 blocks then have the same block size.
    """
    mixed = (runtime, precision) == ("onnxruntime", "int8")  # where `hwnas quantize` honours fp32_down
    total = sum(_matrix_bytes(r, c, runtime, "fp32" if fp32 and mixed else precision, block)
                for r, c, fp32 in linear_shapes(cfg, sig))
    vocab, hidden = sig["vocab_size"], sig["hidden_size"]
    total += 4 * hidden * (2 * cfg.depth + 1)  # RMSNorm weights stay fp32
    total += 4 * rotary_positions * sig["head_dim"]  # cos and sin, (positions, head_dim / 2) each
    quantized = precision in ("int8", "int8-wo", "int4")
    ort = runtime == "onnxruntime"
    if ort and embedding == "int8-rows":
        total += vocab * hidden + 4 * vocab
    elif ort and embedding == "blocks-shared" and precision == "int4" and head_bits == 4:
        total += 2 * 2 * 8  # the lookup reads the 4-bit head's blocks and scales through two int64 row shapes
    elif ort and embedding in ("blocks", "blocks-shared"):
        b = block or 64
        total += (_matrix_bytes(vocab, hidden, runtime, "int8-wo", b) if embedding == "blocks"
                  else 4 * vocab * -(-hidden // b))
        total += 3 * 8  # the int64 shape that joins the gathered blocks into rows
    elif embedding == "auto":
        emb_precision = "int8" if quantized and runtime == "openvino" else ("fp32" if quantized else precision)
        total += _matrix_bytes(vocab, hidden, runtime, emb_precision)
    else:
        raise HwnasError(f"embedding storage {embedding!r} is not one of {runtime}'s; expected auto"
                         + (", int8-rows, blocks or blocks-shared" if ort else ""))
    if not tied:
        head_precision = "int8" if precision == "int4" and runtime == "openvino" else precision
        if precision == "int4" and ort and head_bits == 8:
            head_precision = "int8-wo"
        total += _matrix_bytes(vocab, hidden, runtime, head_precision, block)
    return int(total)


def predict(*, table: Path, subnet: Path, tokens: int | None = None) -> dict[str, Any]:
    """Predicted prefill and decode latency and weight bytes of the sub-network config `subnet`."""
    if tokens is not None and tokens < 1:
        raise HwnasError(f"--tokens must be a positive prompt / cache length, got {tokens}")
    p = LatencyPredictor.load(table)
    cfg = SubnetConfig.from_json(subnet)
    if cfg.num_layers != p.table.header["model_signature"]["num_hidden_layers"]:
        raise HwnasError(f"{subnet} is a sub-network of a {cfg.num_layers}-layer model; {table} is for a "
                         f"{p.table.header['model_signature']['num_hidden_layers']}-layer one")
    out: dict[str, Any] = {"table": str(table), "runtime": p.table.runtime, "precision": p.table.precision,
                           "device": p.table.device_id, "layers": cfg.depth}
    for phase in PHASES:
        t = tokens or p.table.default_tokens(phase)
        out[f"{phase_key(phase, t)}_ms"] = round(p.latency_ms(cfg, phase, t), 3)
        out[f"{phase_key(phase, t)}_block_sum_ms"] = round(p.block_sum(cfg, phase, t), 3)
    out["bytes"] = p.bytes(cfg)
    out["corrections"] = corrections_report(p)
    return out


def corrections_report(p: LatencyPredictor) -> dict[str, Any]:
    return {pk: dataclasses.asdict(c) for pk, c in sorted(p.corrections.items())}
