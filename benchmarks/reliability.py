"""Reliability audit: distinct bad inputs fed to the real `hwnas` CLI, each in a subprocess.

Every case is one command with one thing wrong (a path, a number, a file's content, the output location). The
project's promise (README, "Bad input and safety") is that each gets one line `hwnas: error: ...` (argparse's own
refusals read `hwnas CMD: error: ...`) as the last line of stderr, exit status 2, no traceback, stdout empty or
JSON, and nothing written or changed: not in the case's folder (inputs and outputs), not in the shared fixtures.

The fixtures are the tests' tiny random Llama (tests/conftest.py's `build_tiny`), built under a temporary folder
(--work), with what a case needs of: a sub-network config, its checkpoint, a latency table (torch fp32, short
lengths), a finished tiny search and a copy of the model whose tokenizer is larger than its vocabulary. Output
folders that must be read-only are also made immutable (`chattr +i`) when the audit runs as root, and
a full disk as a 64 KiB tmpfs in a private mount namespace (skipped where that cannot be mounted).

Writes benchmarks/results/reliability.{json,md}:

    nice -n 19 .venv/bin/python benchmarks/reliability.py             (every case; about 15-20 minutes on 2 cores)
    .venv/bin/python benchmarks/reliability.py --quick                (a handful of cases, for a smoke test)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TIMEOUT_S = 300
ERROR_LINE = re.compile(r"^hwnas(?: [a-z-]+)?: error: ")  # ours, or argparse's `hwnas CMD: error:`
CONFIG = {"num_layers": 4, "layers": [0, 2, 3], "mlp": [192] * 3, "heads": [4] * 3, "kv_heads": [2] * 3}


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: `args` after `hwnas`, formatted with the fixtures' paths and `{d}` (the case's folder)."""

    name: str
    command: str
    bad: str
    args: tuple[str, ...]
    needs: tuple[str, ...] = ()  # fixtures beyond the tiny model
    prep: Callable[[Path, dict[str, Path]], None] | None = None
    readonly: bool = False  # {d}/ro is an empty read-only folder (immutable where the audit runs as root)
    full_disk: bool = False  # {d}/full is a 64 KiB tmpfs
    quick: bool = False


# ------------------------------------------------------------------------------------------------ preparations
def file(rel: str, content: str | bytes) -> Callable[[Path, dict[str, Path]], None]:
    def prep(d: Path, fx: dict[str, Path]) -> None:
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return prep


def nonempty(rel: str) -> Callable[[Path, dict[str, Path]], None]:
    return file(f"{rel}/notes.txt", "someone else's file\n")


def copy(fixture: str, rel: str, edit: Callable[[Path], None] | None = None) -> Callable[[Path, dict[str, Path]], None]:
    def prep(d: Path, fx: dict[str, Path]) -> None:
        key, _, sub = fixture.partition("/")  # a fixture, or a file inside one ("search/pareto.json")
        src, dst = fx[key] / sub if sub else fx[key], d / rel
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
        if edit:
            edit(dst)
    return prep


def edit_json(rel: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        p = root / rel if rel else root
        p.write_text(json.dumps(change(json.loads(p.read_text()))))
    return edit


def truncate(rel: str, keep: float = 0.5) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        p = root / rel if rel else root
        data = p.read_bytes()
        p.write_bytes(data[: int(len(data) * keep)])
    return edit


def both(*preps: Callable[[Path, dict[str, Path]], None]) -> Callable[[Path, dict[str, Path]], None]:
    def prep(d: Path, fx: dict[str, Path]) -> None:
        for p in preps:
            p(d, fx)
    return prep


def _set(d: dict, path: str, value: Any) -> dict:
    *keys, last = path.split(".")
    node = d
    for k in keys:
        node = node[k]
    node[last] = value
    return d


# ------------------------------------------------------------------------------------------------ the cases
M = ("--model", "{tiny}")
def pickle_bomb(d: Path, fx: dict[str, Path]) -> None:
    """A state.pkl that, if unpickled, would create {d}/pwned (a write the audit then sees)."""
    file("o/state.pkl", f"cos\nsystem\n(S'touch {d}/pwned'\ntR.".encode())(d, fx)
BAD_CFG = json.dumps({**CONFIG, "mlp": [192, 192]})  # 3 layers, 2 MLP widths
FOREIGN_CFG = json.dumps({"num_layers": 8, "layers": [0, 1, 2, 3, 4, 5, 6, 7], "mlp": [192] * 8, "heads": [4] * 8,
                          "kv_heads": [2] * 8})
SEARCH = ("search", *M, "--table", "{table}", "--evaluations", "4", "--population", "2", "--select", "0")
HEAL = ("heal", "--model", "{ckpt}", "--teacher", "{tiny}", "--tokens", "128", "--seq-len", "32", "--batch-size", "4",
        "--micro-batch", "2", "--train-text", "{text}")
TRAIN = ("train-supernet", *M, "--tokens", "128", "--seq-len", "16", "--batch-size", "4", "--micro-batch", "2",
         "--train-text", "{text}")
BENCH = ("benchmark", "--model", "{tiny}", "--prompt-tokens", "8", "--new-tokens", "2", "--repeats", "1", "--rounds",
         "1")
EVAL = ("evaluate", *M, "--tasks", "arc_easy", "--limit", "2")
QUANT = ("quantize", *M, "--samples", "1", "--accept-loss")
VAL = ("validate-latency", *M, "--samples", "2", "--passes", "1")
RUN = ("run", *M, "--runtime", "torch", "--table", "{table}", "--heal-tokens", "0")


def C(name: str, command: str, bad: str, *args: str, **kw: Any) -> Case:
    return Case(name, command, bad, tuple(args), **kw)


CASES = [
    # space
    C("space-missing-model", "space", "model folder does not exist", "space", "--model", "{d}/missing"),
    C("space-model-is-file", "space", "model path is a file", "space", "--model", "{d}/f.txt", prep=file("f.txt", "x")),
    C("space-empty-folder", "space", "model folder without config.json", "space", "--model", "{d}/m",
      prep=lambda d, fx: (d / "m").mkdir()),
    C("space-corrupt-config", "space", "config.json is not JSON", "space", "--model", "{d}/m",
      prep=file("m/config.json", '{"model_type": "lla')),
    C("space-not-llama", "space", "config.json of another architecture", "space", "--model", "{d}/m",
      prep=file("m/config.json", json.dumps({"model_type": "bert", "hidden_size": 64}))),
    C("space-config-wrong-types", "space", "config.json with a string layer count", "space", "--model", "{d}/m",
      prep=copy("tiny", "m", edit_json("config.json", lambda c: {**c, "num_hidden_layers": "four"}))),
    C("space-mlp-step-zero", "space", "--mlp-step 0", "space", *M, "--mlp-step", "0"),
    C("space-mlp-step-negative", "space", "--mlp-step -64", "space", *M, "--mlp-step", "-64"),
    C("space-tokenizer-past-vocab", "space", "tokenizer larger than the vocabulary", "space", "--model", "{bigtok}",
      needs=("bigtok",)),
    C("space-argparse-int", "space", "--mlp-step abc (argparse)", "space", *M, "--mlp-step", "abc"),
    # sample
    C("sample-existing-file", "sample", "--out is an existing file, no --overwrite", "sample", *M, "--out",
      "{d}/c.json", prep=file("c.json", "my notes\n"), quick=True),
    C("sample-out-is-folder", "sample", "--out is a non-empty folder", "sample", *M, "--out", "{d}/o",
      prep=nonempty("o")),
    C("sample-parent-is-file", "sample", "--out's parent is a file", "sample", *M, "--out", "{d}/f/c.json",
      prep=file("f", "x")),
    C("sample-readonly-folder", "sample", "--out in a read-only folder", "sample", *M, "--out", "{d}/ro/c.json",
      readonly=True, quick=True),
    C("sample-tokenizer-past-vocab", "sample", "tokenizer larger than the vocabulary", "sample", "--model",
      "{bigtok}", "--out", "{d}/c.json", needs=("bigtok",)),
    # export
    C("export-missing-subnet", "export", "--subnet does not exist", "export", *M, "--subnet", "{d}/none.json",
      "--out", "{d}/o"),
    C("export-corrupt-subnet", "export", "--subnet is truncated JSON", "export", *M, "--subnet", "{d}/c.json",
      "--out", "{d}/o", prep=file("c.json", '{"num_layers": 4, "lay')),
    C("export-subnet-is-list", "export", "--subnet is a JSON list", "export", *M, "--subnet", "{d}/c.json", "--out",
      "{d}/o", prep=file("c.json", "[1, 2, 3]")),
    C("export-subnet-wrong-shape", "export", "per-layer lists of different lengths", "export", *M, "--subnet",
      "{d}/c.json", "--out", "{d}/o", prep=file("c.json", BAD_CFG), quick=True),
    C("export-subnet-out-of-range", "export", "MLP width 9999 past the model's 256", "export", *M, "--subnet",
      "{d}/c.json", "--out", "{d}/o", prep=file("c.json", json.dumps({**CONFIG, "mlp": [9999] * 3}))),
    C("export-subnet-other-model", "export", "a config of an 8-layer model", "export", *M, "--subnet", "{d}/c.json",
      "--out", "{d}/o", prep=file("c.json", FOREIGN_CFG)),
    C("export-subnet-bad-layer-index", "export", "layer index -1", "export", *M, "--subnet", "{d}/c.json", "--out",
      "{d}/o", prep=file("c.json", json.dumps({**CONFIG, "layers": [-1, 2, 3]}))),
    C("export-pick-past-front", "export", "--pick 99 of a short pareto front", "export", *M, "--subnet",
      "{search}/pareto.json", "--pick", "99", "--out", "{d}/o", needs=("search",)),
    C("export-pick-negative", "export", "--pick -1", "export", *M, "--subnet", "{search}/pareto.json", "--pick", "-1",
      "--out", "{d}/o", needs=("search",)),
    C("export-pareto-truncated", "export", "pareto.json cut in half", "export", *M, "--subnet", "{d}/p.json",
      "--out", "{d}/o", needs=("search",), prep=copy("search/pareto.json", "p.json", truncate(""))),
    C("export-pareto-empty-front", "export", "pareto.json with an empty front", "export", *M, "--subnet",
      "{d}/p.json", "--out", "{d}/o", needs=("search",),
      prep=copy("search/pareto.json", "p.json", edit_json("", lambda p: {**p, "front": []}))),
    C("export-out-nonempty", "export", "--out is a non-empty folder, no --overwrite", "export", *M, "--subnet",
      "{cfg}", "--out", "{d}/o", needs=("cfg",), prep=nonempty("o")),
    C("export-out-readonly", "export", "--out is an existing read-only folder", "export", *M, "--subnet", "{cfg}",
      "--out", "{d}/ro", needs=("cfg",), readonly=True),
    C("export-tokenizer-past-vocab", "export", "tokenizer larger than the vocabulary", "export", "--model",
      "{bigtok}", "--subnet", "{cfg}", "--out", "{d}/o", needs=("bigtok", "cfg")),
    C("export-full-disk", "export", "the disk fills while writing", "export", *M, "--subnet", "{cfg}", "--out",
      "{d}/full/o", needs=("cfg",), full_disk=True),
    # onnx
    C("onnx-missing-model", "onnx", "--model does not exist", "onnx", "--model", "{d}/missing", "--out", "{d}/o"),
    C("onnx-model-is-file", "onnx", "--model is a config file", "onnx", "--model", "{cfg}", "--out", "{d}/o",
      needs=("cfg",)),
    C("onnx-opset-old", "onnx", "--opset 5", "onnx", "--model", "{ckpt}", "--out", "{d}/o", "--opset", "5",
      needs=("ckpt",)),
    C("onnx-opset-huge", "onnx", "--opset 999", "onnx", "--model", "{ckpt}", "--out", "{d}/o", "--opset", "999",
      needs=("ckpt",)),
    C("onnx-out-nonempty", "onnx", "--out is a non-empty folder", "onnx", "--model", "{ckpt}", "--out", "{d}/o",
      needs=("ckpt",), prep=nonempty("o")),
    C("onnx-corrupt-weights", "onnx", "model.safetensors is truncated", "onnx", "--model", "{d}/m", "--out", "{d}/o",
      needs=("ckpt",), prep=copy("ckpt", "m", truncate("model.safetensors", 0.3))),
    # gguf
    C("gguf-missing-model", "gguf", "--model does not exist", "gguf", "--model", "{d}/missing", "--out", "{d}/m.gguf"),
    C("gguf-out-exists", "gguf", "--out is an existing file", "gguf", *M, "--out", "{d}/m.gguf",
      prep=file("m.gguf", "old")),
    C("gguf-out-readonly", "gguf", "--out in a read-only folder", "gguf", *M, "--out", "{d}/ro/m.gguf",
      readonly=True),
    C("gguf-bad-type", "gguf", "--type q3_k (argparse)", "gguf", *M, "--out", "{d}/m.gguf", "--type", "q3_k"),
    # quantize
    C("quantize-unknown-method", "quantize", "--method gptq", *QUANT, "--method", "gptq", "--out", "{d}/o"),
    C("quantize-samples-zero", "quantize", "--samples 0", "quantize", *M, "--method", "ort-int8", "--samples", "0",
      "--out", "{d}/o"),
    C("quantize-samples-negative", "quantize", "--samples -3", "quantize", *M, "--method", "ort-int8", "--samples",
      "-3", "--out", "{d}/o"),
    C("quantize-max-kl-negative", "quantize", "--max-kl -1", *QUANT, "--method", "ort-int8", "--max-kl", "-1",
      "--out", "{d}/o"),
    C("quantize-max-kl-nan", "quantize", "--max-kl nan", *QUANT, "--method", "ort-int8", "--max-kl", "nan",
      "--out", "{d}/o"),
    C("quantize-group-size-zero", "quantize", "--group-size 0", *QUANT, "--method", "ort-int4", "--group-size", "0",
      "--out", "{d}/o"),
    C("quantize-group-size-indivisible", "quantize", "--group-size 48 divides no width", *QUANT, "--method", "ov-int4",
      "--group-size", "48", "--out", "{d}/o"),
    C("quantize-head-bits-wrong-method", "quantize", "--head-bits 4 with ort-int8", *QUANT, "--method", "ort-int8",
      "--head-bits", "4", "--out", "{d}/o"),
    C("quantize-out-nonempty", "quantize", "--out is a non-empty folder", *QUANT, "--method", "ort-int8", "--out",
      "{d}/o", prep=nonempty("o")),
    C("quantize-out-readonly", "quantize", "--out is an existing read-only folder", *QUANT, "--method", "ort-int8",
      "--out", "{d}/ro", readonly=True),
    C("quantize-model-empty-folder", "quantize", "--model is an empty folder", "quantize", "--model", "{d}/m",
      "--method", "ort-int8", "--out", "{d}/o", prep=lambda d, fx: (d / "m").mkdir()),
    C("quantize-samples-argparse", "quantize", "--samples abc (argparse)", *QUANT, "--method", "ort-int8",
      "--samples", "abc", "--out", "{d}/o"),
    # profile
    C("profile-prefill-past-positions", "profile", "--prefill 100000 on 256 positions", "profile", *M, "--runtime",
      "torch", "--prefill", "100000", "--out", "{d}/t.json"),
    C("profile-decode-past-positions", "profile", "--decode 600 on 256 positions", "profile", *M, "--runtime", "torch",
      "--decode", "600", "--out", "{d}/t.json"),
    C("profile-prefill-negative", "profile", "--prefill -8", "profile", *M, "--runtime", "torch", "--prefill", "-8",
      "--out", "{d}/t.json"),
    C("profile-decode-zero", "profile", "--decode 0", "profile", *M, "--runtime", "torch", "--decode", "0",
      "--out", "{d}/t.json"),
    C("profile-calibration-two", "profile", "--calibration 2 (too few to fit)", "profile", *M, "--calibration", "2",
      "--out", "{d}/t.json"),
    C("profile-repeats-zero", "profile", "--repeats 0", "profile", *M, "--repeats", "0", "--out", "{d}/t.json"),
    C("profile-warmup-negative", "profile", "--warmup -1", "profile", *M, "--warmup", "-1", "--out", "{d}/t.json"),
    C("profile-threads-zero", "profile", "--threads 0", "profile", *M, "--threads", "0", "--out", "{d}/t.json"),
    C("profile-out-exists", "profile", "--out is an existing table, no --resume/--overwrite", "profile", *M,
      "--runtime", "torch", "--out", "{d}/t.json", needs=("table",), prep=copy("table", "t.json")),
    C("profile-resume-truncated", "profile", "--resume from a truncated table", "profile", *M, "--runtime", "torch",
      "--resume", "--out", "{d}/t.json", needs=("table",), prep=copy("table", "t.json", truncate(""))),
    C("profile-import-missing", "profile", "--import-measurements of a missing folder", "profile", *M,
      "--import-measurements", "{d}/none", "--out", "{d}/t.json"),
    C("profile-recalibrate-missing", "profile", "--recalibrate a table that does not exist", "profile", *M,
      "--runtime", "torch", "--recalibrate", "--out", "{d}/t.json"),
    C("profile-out-readonly", "profile", "--out in a read-only folder", "profile", *M, "--runtime", "torch",
      "--calibration", "0", "--warmup", "1", "--repeats", "3", "--prefill", "8", "--decode", "8", "--out",
      "{d}/ro/t.json", readonly=True),
    # predict
    C("predict-missing-table", "predict", "--table does not exist", "predict", "--table", "{d}/none.json",
      "--subnet", "{cfg}", needs=("cfg",)),
    C("predict-corrupt-table", "predict", "--table is not JSON", "predict", "--table", "{d}/t.json", "--subnet",
      "{cfg}", needs=("cfg",), prep=file("t.json", "\x00\x01garbage")),
    C("predict-incomplete-table", "predict", "a table whose profile did not finish", "predict", "--table",
      "{d}/t.json", "--subnet", "{cfg}", needs=("table", "cfg"),
      prep=copy("table", "t.json", edit_json("", lambda t: _set(t, "header.complete", False)))),
    C("predict-table-missing-entries", "predict", "a table with no entries", "predict", "--table", "{d}/t.json",
      "--subnet", "{cfg}", needs=("table", "cfg"),
      prep=copy("table", "t.json", edit_json("", lambda t: {**t, "entries": {}}))),
    C("predict-table-is-config", "predict", "a sub-network config given as --table", "predict", "--table", "{cfg}",
      "--subnet", "{cfg}", needs=("cfg",)),
    C("predict-subnet-wrong-shape", "predict", "per-layer lists of different lengths", "predict", "--table",
      "{table}", "--subnet", "{d}/c.json", needs=("table",), prep=file("c.json", BAD_CFG)),
    C("predict-subnet-other-model", "predict", "a config of an 8-layer model", "predict", "--table", "{table}",
      "--subnet", "{d}/c.json", needs=("table",), prep=file("c.json", FOREIGN_CFG)),
    C("predict-tokens-zero", "predict", "--tokens 0", "predict", "--table", "{table}", "--subnet", "{cfg}",
      "--tokens", "0", needs=("table", "cfg")),
    C("predict-tokens-not-profiled", "predict", "--tokens 77, a length the table has not", "predict", "--table",
      "{table}", "--subnet", "{cfg}", "--tokens", "77", needs=("table", "cfg")),
    C("predict-table-bad-number", "predict", "an entry's mean is a string", "predict", "--table", "{d}/t.json",
      "--subnet", "{cfg}", needs=("table", "cfg"), prep=copy("table", "t.json", edit_json(
          "", lambda t: {**t, "entries": {k: {**v, "mean_ms": "fast"} for k, v in t["entries"].items()}}))),
    # validate-latency
    C("validate-samples-zero", "validate-latency", "--samples 0", *VAL, "--table", "{table}", "--samples", "0",
      "--out", "{d}/o", needs=("table",)),
    C("validate-passes-zero", "validate-latency", "--passes 0", *VAL, "--table", "{table}", "--passes", "0",
      "--out", "{d}/o", needs=("table",)),
    C("validate-missing-table", "validate-latency", "--table does not exist", *VAL, "--table", "{d}/none.json",
      "--out", "{d}/o"),
    C("validate-foreign-table", "validate-latency", "a table of another model", *VAL, "--table", "{foreign}",
      "--out", "{d}/o", needs=("foreign",)),
    C("validate-out-nonempty", "validate-latency", "--out is a non-empty folder", *VAL, "--table", "{table}",
      "--out", "{d}/o", needs=("table",), prep=nonempty("o")),
    # search
    C("search-population-one", "search", "--population 1", *SEARCH, "--population", "1", "--out", "{d}/o",
      needs=("table",)),
    C("search-evaluations-below-population", "search", "--evaluations 1 --population 4", *SEARCH, "--evaluations",
      "1", "--population", "4", "--out", "{d}/o", needs=("table",)),
    C("search-evaluations-zero", "search", "--evaluations 0", *SEARCH, "--evaluations", "0", "--out", "{d}/o",
      needs=("table",)),
    C("search-latency-ratio-zero", "search", "--latency-ratio 0", *SEARCH, "--latency-ratio", "0", "--out", "{d}/o",
      needs=("table",)),
    C("search-latency-ratio-above-one", "search", "--latency-ratio 1.5", *SEARCH, "--latency-ratio", "1.5",
      "--out", "{d}/o", needs=("table",)),
    C("search-latency-budget-negative", "search", "--latency-budget -1", *SEARCH, "--latency-budget", "-1",
      "--out", "{d}/o", needs=("table",)),
    C("search-size-budget-negative", "search", "--size-budget -5", *SEARCH, "--size-budget", "-5", "--out", "{d}/o",
      needs=("table",)),
    C("search-workers-zero", "search", "--workers 0", *SEARCH, "--workers", "0", "--out", "{d}/o", needs=("table",)),
    C("search-select-negative", "search", "--select -1", *SEARCH, "--select", "-1", "--out", "{d}/o",
      needs=("table",)),
    C("search-select-items-zero", "search", "--select-items 0", *SEARCH, "--select-items", "0", "--out", "{d}/o",
      needs=("table",)),
    C("search-crafted-pickle", "search", "a crafted state.pkl in --out", *SEARCH, "--resume", "--out", "{d}/o",
      needs=("table",), prep=pickle_bomb),
    C("search-resume-truncated-state", "search", "--resume from a truncated state.json", *SEARCH, "--resume",
      "--out", "{d}/o", needs=("search",), prep=copy("search", "o", truncate("state.json"))),
    C("search-resume-other-args", "search", "--resume with another --seed", *SEARCH, "--seed", "7", "--resume",
      "--out", "{d}/o", needs=("search",), prep=copy("search", "o")),
    C("search-resume-bad-population", "search", "state.json's population has rows of the wrong length", *SEARCH,
      "--evaluations", "6", "--resume", "--out", "{d}/o", needs=("search",), prep=copy("search", "o", edit_json(
          "state.json", lambda s: _set(_set(s, "args.evaluations", 6), "algorithm.population.X",
                                       [x[:-1] for x in s["algorithm"]["population"]["X"]])))),
    C("search-resume-state-not-object", "search", "state.json is a JSON list", *SEARCH, "--resume", "--out", "{d}/o",
      needs=("table",), prep=file("o/state.json", "[]")),
    C("search-out-nonempty", "search", "--out is a non-empty folder of other files", *SEARCH, "--out", "{d}/o",
      needs=("table",), prep=nonempty("o")),
    C("search-out-holds-search", "search", "--out holds a finished search, no --resume", *SEARCH, "--out", "{d}/o",
      needs=("search",), prep=copy("search", "o")),
    C("search-corrupt-table", "search", "--table is not JSON", *SEARCH[:4], "--table", "{d}/t.json",
      "--evaluations", "4", "--population", "2", "--out", "{d}/o", prep=file("t.json", "{")),
    C("search-foreign-table", "search", "a table of another model", *SEARCH[:4], "--table", "{foreign}",
      "--evaluations", "4", "--population", "2", "--out", "{d}/o", needs=("foreign",)),
    C("search-out-readonly", "search", "--out is an existing read-only folder", *SEARCH, "--out", "{d}/ro",
      needs=("table",), readonly=True),
    C("search-missing-table-arg", "search", "no --table (argparse)", "search", *M, "--out", "{d}/o"),
    # baseline
    C("baseline-ratio-zero", "baseline", "--latency-ratio 0", "baseline", "--method", "layer-drop", *M, "--table",
      "{table}", "--latency-ratio", "0", "--out", "{d}/o", needs=("table",)),
    C("baseline-ratio-above-one", "baseline", "--latency-ratio 2", "baseline", "--method", "layer-drop", *M,
      "--table", "{table}", "--latency-ratio", "2", "--out", "{d}/o", needs=("table",)),
    C("baseline-budget-unreachable", "baseline", "--latency-budget 1e-9 ms", "baseline", "--method", "layer-drop", *M,
      "--table", "{table}", "--latency-budget", "1e-9", "--out", "{d}/o", needs=("table",)),
    C("baseline-missing-table", "baseline", "--table does not exist", "baseline", "--method", "width-uniform", *M,
      "--table", "{d}/none.json", "--latency-ratio", "0.8", "--out", "{d}/o"),
    C("baseline-out-nonempty", "baseline", "--out is a non-empty folder", "baseline", "--method", "layer-drop", *M,
      "--table", "{table}", "--latency-ratio", "0.8", "--out", "{d}/o", needs=("table",), prep=nonempty("o")),
    C("baseline-random-evaluations-zero", "baseline", "--method random --evaluations 0", "baseline", "--method",
      "random", *M, "--table", "{table}", "--latency-ratio", "0.8", "--evaluations", "0", "--out", "{d}/o",
      needs=("table",)),
    # run
    C("run-ratio-zero", "run", "--latency-ratio 0", *RUN, "--latency-ratio", "0", "--out", "{d}/o", needs=("table",)),
    C("run-ratio-negative", "run", "--latency-ratio -0.5", *RUN, "--latency-ratio", "-0.5", "--out", "{d}/o",
      needs=("table",)),
    C("run-heal-tokens-negative", "run", "--heal-tokens -1", *RUN, "--heal-tokens", "-1", "--out", "{d}/o",
      needs=("table",)),
    C("run-heal-candidates-one", "run", "--heal-candidates 1", *RUN, "--heal-candidates", "1", "--out", "{d}/o",
      needs=("table",)),
    C("run-threads-zero", "run", "--threads 0", *RUN, "--threads", "0", "--out", "{d}/o", needs=("table",)),
    C("run-corrupt-table", "run", "--table is truncated JSON", "run", *M, "--runtime", "torch", "--table",
      "{d}/t.json", "--heal-tokens", "0", "--out", "{d}/o", needs=("table",),
      prep=copy("table", "t.json", truncate(""))),
    C("run-table-other-runtime", "run", "a torch table for --runtime onnxruntime", "run", *M, "--runtime",
      "onnxruntime", "--table", "{table}", "--heal-tokens", "0", "--out", "{d}/o", needs=("table",)),
    C("run-out-nonempty", "run", "--out is a non-empty folder", *RUN, "--out", "{d}/o", needs=("table",),
      prep=nonempty("o")),
    C("run-missing-supernet", "run", "--supernet does not exist", *RUN, "--supernet", "{d}/none", "--out", "{d}/o",
      needs=("table",)),
    # heal
    C("heal-tokens-zero", "heal", "--tokens 0", *HEAL, "--tokens", "0", "--out", "{d}/o", needs=("ckpt", "text")),
    C("heal-tokens-negative", "heal", "--tokens -100", *HEAL, "--tokens", "-100", "--out", "{d}/o",
      needs=("ckpt", "text")),
    C("heal-missing-model", "heal", "--model does not exist", "heal", "--model", "{d}/none", "--teacher", "{tiny}",
      "--tokens", "128", "--out", "{d}/o"),
    C("heal-micro-batch-indivisible", "heal", "--micro-batch 3 does not divide --batch-size 4", *HEAL,
      "--micro-batch", "3", "--out", "{d}/o", needs=("ckpt", "text")),
    C("heal-lr-negative", "heal", "--lr -1", *HEAL, "--lr", "-1", "--out", "{d}/o", needs=("ckpt", "text")),
    C("heal-temperature-zero", "heal", "--temperature 0", *HEAL, "--temperature", "0", "--out", "{d}/o",
      needs=("ckpt", "text")),
    C("heal-seq-len-past-positions", "heal", "--seq-len 100000 on 256 positions", *HEAL, "--seq-len", "100000",
      "--out", "{d}/o", needs=("ckpt", "text")),
    C("heal-missing-train-text", "heal", "--train-text does not exist", *HEAL, "--train-text", "{d}/none.txt",
      "--out", "{d}/o", needs=("ckpt", "text")),
    C("heal-empty-train-text", "heal", "--train-text is empty", *HEAL, "--train-text", "{d}/e.txt", "--out", "{d}/o",
      needs=("ckpt", "text"), prep=file("e.txt", "")),
    C("heal-lora-rank-negative", "heal", "--lora-rank -1", *HEAL, "--lora-rank", "-1", "--out", "{d}/o",
      needs=("ckpt", "text")),
    C("heal-out-nonempty", "heal", "--out is a non-empty folder", *HEAL, "--out", "{d}/o", needs=("ckpt", "text"),
      prep=nonempty("o")),
    C("heal-wrong-teacher", "heal", "--teacher is the sub-network itself", *HEAL[:3], "--teacher", "{ckpt}",
      *HEAL[5:], "--out", "{d}/o", needs=("ckpt", "text")),
    # train-supernet
    C("train-tokens-zero", "train-supernet", "--tokens 0", *TRAIN, "--tokens", "0", "--out", "{d}/o", needs=("text",)),
    C("train-seq-len-zero", "train-supernet", "--seq-len 0", *TRAIN, "--seq-len", "0", "--out", "{d}/o",
      needs=("text",)),
    C("train-batch-size-zero", "train-supernet", "--batch-size 0", *TRAIN, "--batch-size", "0", "--out", "{d}/o",
      needs=("text",)),
    C("train-corrupt-jsonl", "train-supernet", "--train-text JSONL with broken lines", *TRAIN, "--train-text",
      "{d}/t.jsonl", "--out", "{d}/o", needs=("text",), prep=file("t.jsonl", '{"text": "a"}\n{"text": \n')),
    C("train-minutes-negative", "train-supernet", "--minutes -1", *TRAIN, "--minutes", "-1", "--out", "{d}/o",
      needs=("text",)),
    C("train-out-nonempty", "train-supernet", "--out is a non-empty folder", *TRAIN, "--out", "{d}/o",
      needs=("text",), prep=nonempty("o")),
    C("train-resume-corrupt-state", "train-supernet", "--resume with a corrupt checkpoint/train_state.json", *TRAIN,
      "--resume", "--out", "{d}/o", needs=("text",), prep=file("o/checkpoint/train_state.json", '{"step": "x"')),
    # benchmark
    C("benchmark-missing-model", "benchmark", "--model does not exist", *BENCH[:1], "--model", "{d}/none",
      *BENCH[3:], "--out", "{d}/b.json"),
    C("benchmark-repeats-zero", "benchmark", "--repeats 0", *BENCH, "--repeats", "0", "--out", "{d}/b.json"),
    C("benchmark-prompt-tokens-zero", "benchmark", "--prompt-tokens 0", *BENCH, "--prompt-tokens", "0", "--out",
      "{d}/b.json"),
    C("benchmark-new-tokens-zero", "benchmark", "--new-tokens 0", *BENCH, "--new-tokens", "0", "--out", "{d}/b.json"),
    C("benchmark-prompt-past-positions", "benchmark", "--prompt-tokens 100000 on 256 positions", *BENCH,
      "--prompt-tokens", "100000", "--out", "{d}/b.json"),
    C("benchmark-out-exists", "benchmark", "--out is an existing file", *BENCH, "--out", "{d}/b.json",
      prep=file("b.json", "{}")),
    C("benchmark-runtime-mismatch", "benchmark", "--runtime onnxruntime for a torch checkpoint", *BENCH, "--runtime",
      "onnxruntime", "--out", "{d}/b.json"),
    C("benchmark-garbage-onnx", "benchmark", "an .onnx file of random bytes", *BENCH[:1], "--model", "{d}/m.onnx",
      *BENCH[3:], "--out", "{d}/b.json", prep=file("m.onnx", os.urandom(256))),
    # evaluate
    C("evaluate-unknown-task", "evaluate", "--tasks nosuchtask", *EVAL[:3], "--tasks", "nosuchtask", "--out",
      "{d}/e.json"),
    C("evaluate-limit-zero", "evaluate", "--limit 0", *EVAL, "--limit", "0", "--out", "{d}/e.json"),
    C("evaluate-fewshot-negative", "evaluate", "--fewshot -1", *EVAL, "--fewshot", "-1", "--out", "{d}/e.json"),
    C("evaluate-batch-size-zero", "evaluate", "--batch-size 0", *EVAL, "--batch-size", "0", "--out", "{d}/e.json"),
    C("evaluate-out-exists", "evaluate", "--out is an existing file", *EVAL, "--out", "{d}/e.json",
      prep=file("e.json", "{}")),
    C("evaluate-runtime-mismatch", "evaluate", "--runtime openvino for a torch checkpoint", *EVAL, "--runtime",
      "openvino", "--out", "{d}/e.json"),
    C("evaluate-llamacpp-no-gguf", "evaluate", "--runtime llamacpp for a torch checkpoint", *EVAL, "--runtime",
      "llamacpp", "--out", "{d}/e.json"),
    C("evaluate-garbage-gguf", "evaluate", "a .gguf file of random bytes", "evaluate", "--model", "{d}/m.gguf",
      *EVAL[3:], "--out", "{d}/e.json", prep=file("m.gguf", os.urandom(256))),
    # perplexity
    C("perplexity-limit-zero", "perplexity", "--limit 0", "perplexity", *M, "--limit", "0"),
    C("perplexity-batch-size-zero", "perplexity", "--batch-size 0", "perplexity", *M, "--limit", "2", "--batch-size",
      "0"),
    C("perplexity-missing-model", "perplexity", "--model does not exist", "perplexity", "--model", "{d}/none"),
    C("perplexity-empty-folder", "perplexity", "--model is an empty folder", "perplexity", "--model", "{d}/m",
      prep=lambda d, fx: (d / "m").mkdir()),
    # generate
    C("generate-max-new-tokens-negative", "generate", "--max-new-tokens -1", "generate", *M, "--max-new-tokens", "-1"),
    C("generate-missing-model", "generate", "--model does not exist", "generate", "--model", "{d}/none"),
    C("generate-tokenizer-past-vocab", "generate", "tokenizer larger than the vocabulary", "generate", "--model",
      "{bigtok}", "--max-new-tokens", "2", needs=("bigtok",)),
    C("generate-weights-mismatch", "generate", "config.json's MLP width does not match the weights", "generate",
      "--model", "{d}/m", "--max-new-tokens", "2",
      prep=copy("tiny", "m", edit_json("config.json", lambda c: {**c, "intermediate_size": 512}))),
]


# ------------------------------------------------------------------------------------------------ fixtures
FIXTURES = ("tiny", "bigtok", "cfg", "ckpt", "table", "foreign", "search", "text")
WORDS = ("the capital of France is Paris Italy Rome she looked at him and smiled then walked to door without a word "
         "small model learns shape language from many pages books").split()


def build_fixtures(root: Path, needed: set[str]) -> dict[str, Path]:
    """The fixtures the selected cases need, built once under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    fx = {name: root / name for name in FIXTURES}
    fx["cfg"], fx["table"], fx["foreign"], fx["text"] = (root / "cfg.json", root / "torch.json", root / "foreign.json",
                                                          root / "train.txt")
    needed = set(needed) | {"tiny"}
    needed |= {"cfg"} if "ckpt" in needed else set()
    needed |= {"table"} if needed & {"search", "foreign"} else set()
    spec = importlib.util.spec_from_file_location("hwnas_test_conftest", ROOT / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)  # the tests' tiny random Llama, built the same way
    conftest.build_tiny(fx["tiny"])
    if "bigtok" in needed:  # the same weights (vocabulary 320) with 80 more tokens in the tokenizer
        from transformers import AutoTokenizer

        shutil.copytree(fx["tiny"], fx["bigtok"])
        tok = AutoTokenizer.from_pretrained(fx["bigtok"])
        tok.add_tokens([f"extra{i}" for i in range(80)])
        tok.save_pretrained(fx["bigtok"])
    if "cfg" in needed:
        fx["cfg"].write_text(json.dumps(CONFIG))
    if "ckpt" in needed:
        from hwnas.export import export_checkpoint

        export_checkpoint(model=str(fx["tiny"]), subnet=fx["cfg"], out=fx["ckpt"])
    if "table" in needed:
        from hwnas.profile import profile

        profile(model=str(fx["tiny"]), runtime="torch", precision="fp32", calibration=0, warmup=1, repeats=3,
                prefill=[8], decode=[8], out=fx["table"], progress=False)
    if "foreign" in needed:  # the table, as if measured on a model of another hidden size
        t = json.loads(fx["table"].read_text())
        t["header"]["model_signature"]["hidden_size"] = 128
        fx["foreign"].write_text(json.dumps(t))
    if "search" in needed:
        from hwnas.search import run_search

        run_search(model=str(fx["tiny"]), table=str(fx["table"]), evaluations=4, population=2, select=0,
                   out=str(fx["search"]), progress=False)
    if "text" in needed:
        import random

        rng = random.Random(0)
        fx["text"].write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "."
                                          for _ in range(40)))
    return fx


# ------------------------------------------------------------------------------------------------ one case
def snapshot(folder: Path, skip: set[Path] = frozenset()) -> dict[str, str]:
    """Every path under `folder` with its kind, mode and content hash: what a case may not change."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p in skip or any(s in p.parents for s in skip):
            continue
        st = p.lstat()
        if p.is_symlink():
            out[str(p.relative_to(folder))] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[str(p.relative_to(folder))] = f"dir:{st.st_mode & 0o7777:o}"
        else:
            out[str(p.relative_to(folder))] = f"file:{st.st_mode & 0o7777:o}:{hashlib.sha1(p.read_bytes()).hexdigest()}"
    return out


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted([f"+{k}" for k in after.keys() - before.keys()] + [f"-{k}" for k in before.keys() - after.keys()]
                  + [f"~{k}" for k in before.keys() & after.keys() if before[k] != after[k]])


def _make_readonly(folder: Path) -> bool:
    """`folder`, empty, read-only even to root (immutable, `chattr +i`); False where that is not possible."""
    folder.mkdir()
    os.chmod(folder, 0o555)
    if os.geteuid() != 0:
        return True
    return subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0


def run_case(case: Case, work: Path, fx: dict[str, Path], env: dict[str, str]) -> dict[str, Any]:
    d = work / "cases" / case.name
    d.mkdir(parents=True)
    try:
        return _run_case(case, d, work, fx, env)
    finally:
        if case.readonly and os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(d / "ro")], capture_output=True)


def _run_case(case: Case, d: Path, work: Path, fx: dict[str, Path], env: dict[str, str]) -> dict[str, Any]:
    result: dict[str, Any] = {"name": case.name, "command": case.command, "bad": case.bad}
    skip: set[Path] = set()
    if case.prep:
        case.prep(d, fx)
    if case.readonly and not _make_readonly(d / "ro"):
        return {**result, "argv": ["hwnas", *case.args], "skipped": "chattr +i is refused here (a read-only folder "
                "cannot be made for root)"}
    args = [a.format_map({**{k: str(v) for k, v in fx.items()}, "d": str(d)}) for a in case.args]
    cmd = [sys.executable, "-m", "hwnas.cli", *args]
    listing = d / "full.listing"
    if case.full_disk:
        (d / "full").mkdir()
        skip.add(listing)
        cmd = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0" || exit 97; "$@"; rc=$?; '
               'ls -A "$0" > "$0.listing"; exit $rc', str(d / "full"), *cmd]
    before, shared = snapshot(d, skip), snapshot(fx["tiny"].parent)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S, cwd=d)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = None, (e.stdout or b"").decode(errors="replace"), (e.stderr or b"").decode(
            errors="replace")
    seconds = time.monotonic() - t0
    result["argv"] = ["hwnas", *[a.replace(str(work), "WORK") for a in args]]
    if case.full_disk and rc == 97:
        return {**result, "skipped": "a tmpfs cannot be mounted here (needs a private mount namespace)"}
    written = changes(before, snapshot(d, skip))
    written += [f"~fixtures/{c[1:]}" for c in changes(shared, snapshot(fx["tiny"].parent))]
    if case.full_disk and listing.is_file():
        written += [f"+full/{n}" for n in listing.read_text().split()]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    stdout_ok = not stdout.strip() or _is_json(stdout)
    outcome = {"exit": rc, "timed_out": rc is None, "error_line": bool(ERROR_LINE.match(last)), "last_line": last[:300],
               "traceback": "Traceback (most recent call last)" in stderr, "stdout_ok": stdout_ok,
               "written": written, "seconds": round(seconds, 1)}
    outcome["clean"] = (rc == 2 and outcome["error_line"] and not outcome["traceback"] and stdout_ok and not written)
    if not outcome["clean"]:
        outcome["stderr_tail"] = "\n".join(lines[-12:])[-2000:]
    return {**result, **outcome}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ the report
def why(r: dict[str, Any]) -> str:
    reasons = []
    if r["timed_out"]:
        reasons.append(f"no answer within {TIMEOUT_S} s")
    elif r["exit"] != 2:
        reasons.append(f"exit {r['exit']}")
    if r["traceback"]:
        reasons.append("traceback")
    if not r["error_line"] and not r["timed_out"]:
        reasons.append("last stderr line is not `hwnas: error: ...`")
    if not r["stdout_ok"]:
        reasons.append("stdout is not JSON")
    if r["written"]:
        reasons.append("wrote " + ", ".join(r["written"][:4]) + (" ..." if len(r["written"]) > 4 else ""))
    return "; ".join(reasons)


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    ran = [r for r in results if "skipped" not in r]
    by_command: dict[str, dict[str, int]] = {}
    for r in ran:
        c = by_command.setdefault(r["command"], {"cases": 0, "clean": 0})
        c["cases"] += 1
        c["clean"] += bool(r["clean"])
    return {"cases": len(results), "ran": len(ran), "skipped": len(results) - len(ran),
            "clean": sum(bool(r["clean"]) for r in ran), "failed": sum(not r["clean"] for r in ran),
            "tracebacks": sum(r["traceback"] for r in ran), "exit_not_2": sum(r["exit"] != 2 for r in ran),
            "wrote_something": sum(bool(r["written"]) for r in ran),
            "stdout_not_json": sum(not r["stdout_ok"] for r in ran),
            "by_command": by_command}


def markdown(report: dict[str, Any]) -> str:
    s, meta = report["summary"], report["meta"]
    lines = [f"# Reliability audit ({meta['date']}{', quick' if meta['quick'] else ''})", "",
             f"`{meta['cmdline']}` on the tests' tiny random Llama, each case `hwnas ...` in a subprocess "
             f"(hwnas {meta['hwnas']}, Python {meta['python']}, {meta['user']}).", "",
             f"**{s['clean']} of {s['ran']} bad inputs got the one-line error** (exit 2, last stderr line "
             f"`hwnas: error: ...`, no traceback, stdout empty or JSON, nothing written); {s['failed']} did not"
             + (f", {s['skipped']} skipped." if s["skipped"] else "."), "",
             f"Tracebacks: {s['tracebacks']}. Exit other than 2: {s['exit_not_2']}. Wrote or changed files: "
             f"{s['wrote_something']}. Stdout not JSON: {s['stdout_not_json']}.", "",
             "| command | cases | clean |", "|---|---:|---:|"]
    lines += [f"| {c} | {v['cases']} | {v['clean']} |" for c, v in s["by_command"].items()]
    failed = [r for r in report["cases"] if "skipped" not in r and not r["clean"]]
    lines += ["", "## Failures", ""] + ([f"- **{r['name']}** ({r['bad']}): {why(r)}.  \n  `{' '.join(r['argv'])}`  \n"
                                         f"  last line: `{r['last_line'][:200]}`" for r in failed] or ["None."])
    skipped = [r for r in report["cases"] if "skipped" in r]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {r['name']}: {r['skipped']}" for r in skipped]
    lines += ["", "Every case, its command line and outcome: `reliability.json`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="only the cases marked quick (a smoke test)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="only these cases (names or prefixes)")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of reliability.{json,md}")
    p.add_argument("--work", type=Path, default=None, help="fixtures and case folders (default: a temporary folder)")
    args = p.parse_args(argv)
    from hwnas import __version__, point_library_caches
    from hwnas.common import atomic_write_json, atomic_write_text

    point_library_caches()
    cases = [c for c in CASES if (not args.quick or c.quick)
             and (not args.only or any(c.name.startswith(o) for o in args.only))]
    if not cases:
        raise SystemExit(f"no case matches {args.only}")
    work = Path(tempfile.mkdtemp(prefix="hwnas-reliability-")) if args.work is None else args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        fx = build_fixtures(work / "fixtures", {n for c in cases for n in c.needs})
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        results = []
        for i, case in enumerate(cases, 1):
            r = run_case(case, work, fx, env)
            results.append(r)
            status = "skip" if "skipped" in r else ("ok" if r["clean"] else "FAIL " + why(r))
            print(f"[{i}/{len(cases)}] {case.name}: {status}", file=sys.stderr, flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report = {"meta": {"date": datetime.date.today().isoformat(), "quick": args.quick, "hwnas": __version__,
                       "python": platform.python_version(), "cmdline": "benchmarks/reliability.py"
                       + (" --quick" if args.quick else "") + (" --only " + " ".join(args.only) if args.only else ""),
                       "user": "root, read-only folders immutable" if os.geteuid() == 0 else f"uid {os.geteuid()}"},
              "summary": summarize(results), "cases": results}
    atomic_write_json(args.results / "reliability.json", report)
    atomic_write_text(args.results / "reliability.md", markdown(report))
    print(json.dumps({k: v for k, v in report["summary"].items() if k != "by_command"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
