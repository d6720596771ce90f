"""Nothing a user hands over runs code: no unsafe loader in the package, and a crafted search state is refused."""
import ast
import json
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest

from hwnas import HwnasError
from hwnas.encoding import GeneEncoder
from hwnas.search import nsga2, run_search
from hwnas.search_state import StateFile
from hwnas.space import SearchSpace

PACKAGE = Path(__file__).resolve().parents[1] / "plugin" / "hwnas"

# Loaders that run code from the data they read, or that trust code shipped with a model.
UNSAFE = {
    "pickle.load": re.compile(r"\b(?:c?pickle|_pickle)\s*\.\s*(?:loads?|Unpickler)\b"),
    "from pickle import": re.compile(r"^\s*from\s+(?:c?pickle|_pickle)\s+import\b", re.M),
    "dill": re.compile(r"\bdill\b"),
    "cloudpickle": re.compile(r"\bcloudpickle\b"),
    "joblib.load": re.compile(r"\bjoblib\s*\.\s*load\b|^\s*from\s+joblib\s+import\b[^\n]*\bload\b", re.M),
    "trust_remote_code=True": re.compile(r"""\btrust_remote_code["']?\s*[=:]\s*True\b"""),
    "allow_pickle=True": re.compile(r"\ballow_pickle\s*=\s*True\b"),
    "read_pickle": re.compile(r"\bread_pickle\b"),
    "from torch import load": re.compile(r"^\s*from\s+torch\s+import\b[^\n]*\bload\b", re.M),
}


def unsafe_calls(source: str, name: str = "<source>") -> list[str]:
    """`file:line: what` for each unsafe loader in `source`; `torch.load(...)` counts unless the same call passes
    `weights_only=True`."""
    hits = []
    for what, pattern in UNSAFE.items():
        for m in pattern.finditer(source):
            hits.append(f"{name}:{source.count(chr(10), 0, m.start()) + 1}: {what}")
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                hits.append(f"{name}:{node.lineno}: torch.load without weights_only=True")
    return hits


def test_the_package_has_no_unsafe_loader():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    hits = [h for f in files for h in unsafe_calls(f.read_text(encoding="utf-8"), str(f.relative_to(PACKAGE)))]
    assert hits == [], "unsafe loaders in the package:\n" + "\n".join(hits)


@pytest.mark.parametrize("source, found", [
    ("import pickle\nx = pickle.load(f)\n", ["pickle.load"]),
    ("x = pickle.loads(b)\ny = pickle.Unpickler(f)\n", ["pickle.load", "pickle.load"]),
    ("from pickle import loads\n", ["from pickle import"]),
    ("import dill\n", ["dill"]),
    ("import cloudpickle as cp\n", ["cloudpickle"]),
    ("m = joblib.load(p)\n", ["joblib.load"]),
    ("from joblib import dump, load\n", ["joblib.load"]),
    ("m = AutoModel.from_pretrained(p, trust_remote_code=True)\n", ["trust_remote_code=True"]),
    ("kw = {'trust_remote_code': True}\n", ["trust_remote_code=True"]),
    ("a = np.load(p, allow_pickle=True)\n", ["allow_pickle=True"]),
    ("sd = torch.load(p)\n", ["torch.load without weights_only=True"]),
    ("sd = torch.load(\n    p,\n    map_location='cpu',\n)\n", ["torch.load without weights_only=True"]),
    ("sd = torch.load(p, weights_only=False)\n", ["torch.load without weights_only=True"]),
    ("sd = torch.load(p, map_location='cpu',\n               weights_only=True)\n", []),
    ("x = AutoModel.from_pretrained(p, trust_remote_code=False)\nstate = json.load(f)\n", []),
    ('"""Never pickle: a state file is JSON."""\n', []),
])
def test_the_scanner_finds_each_unsafe_loader(source, found):
    assert [h.split(": ", 1)[1] for h in unsafe_calls(source)] == found


# ------------------------------------------------------------------------------- crafted state files
class _Payload:
    """Unpickling this creates `marker`: what a crafted state file could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in folder.rglob("*")}


def _search(tiny_model, tiny_tables, out, **kw):
    args = dict(model=str(tiny_model), table=str(tiny_tables["onnxruntime"]), evaluations=8, population=4,
                sequences=2, seq_len=32, latency_ratio=0.8, select=0, out=str(out), progress=False)
    return run_search(**{**args, **kw})


@pytest.fixture
def crafted(tmp_path):
    """A folder holding a pickle that would create `marker` when loaded (checked here on a copy)."""
    payload = pickle.dumps(_Payload(tmp_path / "marker"))
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control")))  # the payload is live: it runs when unpickled
    assert (tmp_path / "control").is_dir()
    (tmp_path / "s").mkdir()
    return tmp_path / "s", payload, tmp_path / "marker"


@pytest.mark.parametrize("name, message", [("state.pkl", "earlier hwnas with pickle, which is unsafe to load"),
                                           ("state.json", "not valid JSON")])
@pytest.mark.parametrize("resume", [True, False])
def test_a_crafted_state_file_never_runs(name, message, resume, crafted, tiny_model, tiny_tables):
    folder, payload, marker = crafted
    (folder / name).write_bytes(payload)
    before = _snapshot(folder)
    with pytest.raises(HwnasError, match=message if resume or name == "state.pkl" else "pass --resume") as e:
        _search(tiny_model, tiny_tables, folder, resume=resume)
    assert "\n" not in str(e.value) and (name in str(e.value) or not resume)
    assert not marker.exists()
    assert _snapshot(folder) == before


@pytest.mark.parametrize("name", ["state.pkl", "state.json"])
def test_the_cli_refuses_a_crafted_state_file(name, crafted, run_cli, tiny_model, tiny_tables):
    folder, payload, marker = crafted
    (folder / name).write_bytes(payload)
    before = _snapshot(folder)
    proc = run_cli("search", "--model", str(tiny_model), "--table", str(tiny_tables["onnxruntime"]), "--resume",
                   "--out", str(folder), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hwnas: error: ") and name in lines[0], proc.stderr
    assert proc.stdout == ""
    assert not marker.exists()
    assert _snapshot(folder) == before


# ---------------------------------------------------------------------------- broken state files
@pytest.fixture(scope="module")
def saved_search(tiny_model, tiny_tables, tmp_path_factory):
    """A finished NSGA-II search under a latency budget; its state.json is what the tests below break."""
    out = tmp_path_factory.mktemp("saved") / "s"
    _search(tiny_model, tiny_tables, out)
    return out


def _resume_with(state: bytes, tiny_model, tiny_tables, folder: Path) -> HwnasError:
    folder.mkdir()
    (folder / "state.json").write_bytes(state)
    before = _snapshot(folder)
    with pytest.raises(HwnasError) as e:
        _search(tiny_model, tiny_tables, folder, resume=True)
    assert _snapshot(folder) == before
    message = str(e.value)
    assert "\n" not in message and len(message) < 400, message
    return e.value


@pytest.mark.parametrize("case", ["empty", "truncated", "random bytes", "null", "a list", "an object", "NaN"])
def test_a_broken_state_file_is_an_hwnas_error(case, saved_search, tiny_model, tiny_tables, tmp_path):
    good = (saved_search / "state.json").read_bytes()
    state = {"empty": b"", "truncated": good[: len(good) // 2], "random bytes": random.Random(0).randbytes(300),
             "null": b"null", "a list": b"[]", "an object": b"{}",
             "NaN": good.replace(b'"generation":', b'"generation":NaN,"x":', 1)}[case]
    e = _resume_with(state, tiny_model, tiny_tables, tmp_path / "s")
    assert str(tmp_path / "s" / "state.json") in str(e)


def test_a_state_that_does_not_fit_the_search_space_is_refused(saved_search, tiny_model, tiny_tables, tmp_path):
    state = json.loads((saved_search / "state.json").read_text())
    state["algorithm"]["population"]["X"][0] = state["algorithm"]["population"]["X"][0][:-1]
    e = _resume_with(json.dumps(state).encode(), tiny_model, tiny_tables, tmp_path / "s")
    assert re.search(r"state\.json: algorithm\.population\.X\[0\] is .*; expected 12 whole numbers", str(e))


def _space(tiny_model):
    return SearchSpace.from_hf_config(json.loads((tiny_model / "config.json").read_text()))


def _load(folder: Path, state: dict, encoder: GeneEncoder, args: dict) -> None:
    """Every check a resume with `args` makes, without loading the model."""
    from pymoo.core.problem import Problem
    from pymoo.core.termination import NoTermination

    (folder / "state.json").write_text(json.dumps(state))
    f = StateFile(folder)
    f.read(args)
    f.rows(encoder, 8)
    lo, hi = encoder.bounds
    problem = Problem(n_var=encoder.n_var, n_obj=3, n_ieq_constr=1, xl=lo, xu=hi, vtype=int)
    f.restore_nsga2(nsga2(4, np.tile(hi, (4, 1))).setup(problem, termination=NoTermination(), seed=0), encoder, 1)


def _set(state: dict, path: str, value) -> dict:
    *parents, last = path.split(".")
    d = state
    for k in parents:
        d = d[int(k)] if isinstance(d, list) else d[k]
    key = int(last) if isinstance(d, list) else last
    if value is _DELETE:
        del d[key]
    else:
        d[key] = value
    return state


_DELETE = object()


@pytest.mark.parametrize("path, value, message", [
    ("format", 2, "format is 2; expected format 1"),
    ("format", _DELETE, "format is None; expected format 1"),
    ("kind", "something", "not a hwnas-search-state"),
    ("generation", "3", "generation is '3'; expected an integer >= 0"),
    ("evaluations", {}, "evaluations is {}; expected a list"),
    ("evaluations.0.quality", "low", "evaluations\\[0\\].quality is 'low'; expected a number"),
    ("evaluations.0.config.num_layers", 5, "evaluations\\[0\\].config does not fit this search space"),
    ("evaluations.1.config", None, "evaluations\\[1\\].config does not fit"),
    ("evaluations.0.generation", -1, "evaluations\\[0\\].generation is -1; expected an integer >= 0"),
    ("algorithm.name", "cmaes", "algorithm.name is 'cmaes'; expected 'nsga2'"),
    ("algorithm.n_iter", 0, "algorithm.n_iter is 0"),
    ("algorithm.rng.bit_generator", "MT19937", "algorithm.rng is .*; expected .*PCG64"),
    ("algorithm.rng.state.state", -1, "algorithm.rng is"),
    ("algorithm.population.X.0.0", 99, "algorithm.population.X\\[0\\] is .*; expected 12 whole numbers"),
    ("algorithm.population.X.0.0", 0.5, "algorithm.population.X\\[0\\]"),
    ("algorithm.population.X", [], "algorithm.population has 0 members; expected 1 to 4"),
    ("algorithm.population.F.0", [1.0, 2.0], "algorithm.population.F has the wrong shape; expected 4 rows of 3"),
    ("algorithm.population.G.0", [], "algorithm.population.G has the wrong shape; expected 4 rows of 1"),
    ("algorithm.population.F.0.0", "-inf-", "algorithm.population.F is '-inf-'; expected a number"),
    ("algorithm.population.rank", [0, 0], "algorithm.population.rank has 2 entries; expected 4"),
    ("algorithm.population.crowding", [None] * 4, "feasible member 0 of algorithm.population has no rank or crowding"),
    ("algorithm.population", _DELETE, "algorithm.population is missing"),
])
def test_each_wrong_field_is_named(path, value, message, saved_search, tiny_model, tmp_path):
    state = json.loads((saved_search / "state.json").read_text())
    state["algorithm"]["population"]["G"] = [[-1.0]] * 4  # every member meets the budget, so all are ranked
    with pytest.raises(HwnasError, match=f"search state .*state.json: {message}"):
        _load(tmp_path, _set(state, path, value), GeneEncoder(_space(tiny_model)), dict(state["args"]))


def test_the_saved_state_passes_every_check_and_arguments_must_match(saved_search, tiny_model, tmp_path):
    state = json.loads((saved_search / "state.json").read_text())
    _load(tmp_path, state, GeneEncoder(_space(tiny_model)), state["args"])
    with pytest.raises(HwnasError, match="cannot resume: seed was 0, now 1"):
        StateFile(tmp_path).read({**state["args"], "seed": 1})
    with pytest.raises(HwnasError, match="evaluations\\[0\\].config does not fit this search space .*mixed precision"):
        layers = len(state["evaluations"][0]["config"]["layers"])
        _load(tmp_path, _set(state, "evaluations.0.config.fp32_down", [1] * layers), GeneEncoder(_space(tiny_model)),
              state["args"])


def test_random_corruptions_load_or_give_an_hwnas_error(saved_search, tiny_model, tmp_path):
    """Replace or delete random fields, or cut and flip random bytes: every result loads or is an HwnasError."""
    good = json.loads((saved_search / "state.json").read_text())
    encoder, rng = GeneEncoder(_space(tiny_model)), random.Random(0)
    values = [None, True, -1, 0, 1, 3, 2.5, 1e308, 10 ** 40, "inf", "nan", "", "x", [], [0], [[0]], {}, {"a": 1}]

    def paths(node, prefix=""):
        yield prefix[:-1]
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for k, v in items:
            yield from paths(v, f"{prefix}{k}.")

    every = [p for p in paths(good) if p]
    loaded = refused = 0
    for i in range(300):
        if i % 3 == 2:
            raw = json.dumps(good).encode()
            cut = rng.randrange(len(raw))
            (tmp_path / "state.json").write_bytes(raw[:cut] + bytes([rng.randrange(256)]) + raw[cut + 1:])
            state = None
        else:
            state = _set(json.loads(json.dumps(good)), rng.choice(every), _DELETE if i % 3 else rng.choice(values))
        try:
            if state is None:
                f = StateFile(tmp_path)
                f.read(good["args"])
            else:
                _load(tmp_path, state, encoder, good["args"])
            loaded += 1
        except HwnasError:
            refused += 1
    assert loaded + refused == 300 and refused > 150
