"""The package's imports follow the pipeline: no cycles, no upward imports, no private names across modules."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "plugin" / "hwnas"

# Pipeline order: a module imports only modules of its own rank or lower (and never in a cycle).
RANKS = {
    0: ["common", "defaults", "progress", "space", "runner"],
    1: ["data", "modeling", "loading", "tables", "quantize_settings", "tasks", "tasks.loaders"],
    2: ["elastic", "supernet", "metrics"],
    3: ["predictor", "quality", "selection", "distill"],
    4: ["encoding", "pruning", "parallel", "instatune"],
    5: ["search", "search_report", "search_state"],
    6: ["fused", "export", "llamacpp", "gguf_export", "onnx_graph", "quantize_backends", "quantize", "deploy", "heal",
        "heal_select"],
    7: ["blocks", "profile", "recalibrate", "validate_latency", "decoders", "benchmark", "genai", "lmeval", "lmeval_edge",
        "baselines", "run_report"],
    8: ["pipeline", "cli"],
}
RANK = {m: r for r, mods in RANKS.items() for m in mods}
TORCH_FREE = ["runner", "common", "defaults", "progress", "space", "tables", "quantize_settings"]  # run on edge devices with only numpy and a runtime


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name:
            out[name] = f
    return out


def imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(hwnas module imported, names taken from it, line) for every import in `path`, function-local ones too."""
    pkg = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("hwnas"):
                target = node.module[len("hwnas."):] if node.module != "hwnas" else ""
            else:
                continue
            names = [a.name for a in node.names]
            if target == "":  # `from . import x`: x is a module
                found += [(n, [], node.lineno) for n in names]
            else:
                found.append((target, names, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name[len("hwnas."):], [], node.lineno) for a in node.names if a.name.startswith("hwnas.")]
    return found


def graph() -> dict[str, dict[str, list]]:
    mods = modules()
    edges: dict[str, dict[str, list]] = {m: {} for m in mods if m}
    for name, path in mods.items():
        for target, names, line in imports(name, path):
            if target in mods and target != name:
                edges[name].setdefault(target, []).append((line, names))
    return edges


def test_every_module_has_a_rank():
    assert sorted(set(modules()) - set(RANK)) == [], "give new modules a rank in RANKS"


def test_no_upward_imports():
    upward = [f"{m} (rank {RANK[m]}) -> {t} (rank {RANK[t]}), line {calls[0][0]}"
              for m, targets in graph().items() for t, calls in targets.items() if RANK[t] > RANK[m]]
    assert upward == []


def test_no_import_cycles():
    edges, state, cycles = graph(), {}, []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for t in edges[m]:
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_no_private_names_across_modules():
    private = [f"{m}:{line} takes {n} from {t}" for m, targets in graph().items() for t, calls in targets.items()
               for line, names in calls for n in names if n.startswith("_")]
    assert private == []


@pytest.mark.parametrize("name", TORCH_FREE)
def test_edge_modules_stay_torch_free(name):
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    heavy = {"torch", "transformers", "optimum", "nncf", "peft", "accelerate"}
    found = [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
    found += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module and not node.level]
    assert sorted({f.split(".")[0] for f in found} & heavy) == []
    assert all(RANK[t] == 0 for t in graph()[name]), f"{name} imports {sorted(graph()[name])}"


def test_the_rule_catches_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    # the walker on a made-up package: cli -> pipeline is fine, common -> pipeline is upward, pipeline <-> cli a cycle
    pkg = tmp_path / "hwnas"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "common.py").write_text("def f():\n    from .pipeline import run\n")
    (pkg / "pipeline.py").write_text("from . import cli\nrun = 1\n")
    (pkg / "cli.py").write_text("from .pipeline import run\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    with pytest.raises(AssertionError, match="common"):
        test_no_upward_imports()
    with pytest.raises(AssertionError, match="cli -> pipeline -> cli|pipeline -> cli -> pipeline"):
        test_no_import_cycles()
