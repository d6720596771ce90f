"""Property tests (hypothesis) of every parser of user input: sub-network configs, pareto.json and --pick, latency
tables, the search state and the CLI's numbers and paths. Each input loads or raises `HwnasError` with a one-line
message; never another exception, and nothing is written where an input is refused."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hwnas import HwnasError
from hwnas.cli import main
from hwnas.encoding import GeneEncoder
from hwnas.export import read_subnet
from hwnas.predictor import LatencyPredictor, predict
from hwnas.search_state import LinasState, StateFile, rng_state
from hwnas.space import SearchSpace, SubnetConfig
from hwnas.tables import PHASES, TABLE_FORMAT, blocks_for, blocks_of, model_signature, phase_key

# the tiny GQA model of conftest: 4 layers, MLP 256 in steps of 64, 4 query heads in 2 KV groups
MODEL = {"num_hidden_layers": 4, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
         "hidden_size": 64, "vocab_size": 320}
SPACE = SearchSpace.from_hf_config(MODEL)
SIG = model_signature(MODEL)
# session fixtures serve every example; each example writes into a fresh folder of its own.
# HWNAS_PROPERTY_EXAMPLES sets the examples per test (80: about 1,000 inputs in all; 400: about 5,000)
SETTINGS = settings(max_examples=int(os.environ.get("HWNAS_PROPERTY_EXAMPLES", "80")), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
JSON = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                    max_leaves=10)
# texts that json and Python choke on in ways other than JSONDecodeError
NASTY_TEXTS = ["[" * 5000, "1" * 5000, '{"a": ' * 3000, "NaN", "-Infinity", "", "\ufeff{}", "null", "[]", "{}", '"x"']
VALID_CONFIGS = st.integers(0, 10_000).map(lambda seed: SPACE.sample(seed).to_dict())


def loads_or_refuses(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn`'s result, or the HwnasError it raised (a one-line message); any other exception fails the test."""
    try:
        return fn(*args, **kwargs)
    except HwnasError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))
        return e


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in folder.rglob("*")}


@contextlib.contextmanager
def fresh_folder() -> Any:
    with tempfile.TemporaryDirectory(prefix="hwnas-prop-") as d:
        yield Path(d)


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    return path


# ------------------------------------------------------------------------------------ SubnetConfig
@st.composite
def subnet_dicts(draw: st.DrawFn) -> dict[Any, Any]:
    """Config dicts near the tiny space's: right or wrong lengths, values in and out of range, wrong types,
    missing and unknown keys."""
    depth = draw(st.integers(0, 5))

    def per_layer(choices: list[int]) -> st.SearchStrategy:
        fitting = st.lists(st.sampled_from(choices), min_size=depth, max_size=depth)
        return st.one_of(fitting, fitting, st.lists(st.integers(-3, 300) | st.sampled_from(choices), max_size=6),
                         st.lists(JSON, max_size=4), JSON)

    fields = {
        "num_layers": st.one_of(st.just(4), st.integers(-2, 6), JSON),
        "layers": st.one_of(st.lists(st.integers(0, 3), min_size=min(depth, 4), max_size=min(depth, 4),
                                     unique=True).map(sorted),
                            st.lists(st.integers(-2, 6), max_size=6), JSON),
        "mlp": per_layer(list(SPACE.mlp_choices)),
        "heads": per_layer([1, 2, 3, 4]),
        "kv_heads": per_layer([1, 2]),
        "fp32_down": per_layer([0, 1]),
    }
    d: dict[Any, Any] = {k: draw(s) for k, s in fields.items() if draw(st.integers(0, 9))}  # a key missing 1 in 10
    d.update(draw(st.just({}) | st.dictionaries(st.text(max_size=8) | st.integers(), JSON, max_size=2)))
    return d


@SETTINGS
@given(data=subnet_dicts() | JSON)
def test_subnet_config_from_dict_loads_or_refuses(data):
    cfg = loads_or_refuses(SubnetConfig.from_dict, data)
    if isinstance(cfg, SubnetConfig):
        assert SubnetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        loads_or_refuses(SPACE.validate, cfg)


FILE_CONTENTS = st.one_of(
    st.binary(max_size=200),
    JSON.map(json.dumps),
    subnet_dicts().map(lambda d: json.dumps(d)),
    VALID_CONFIGS.map(json.dumps).flatmap(lambda s: st.integers(0, len(s)).map(lambda n: s[:n])),  # truncated
    st.sampled_from(NASTY_TEXTS),
)


@SETTINGS
@given(content=FILE_CONTENTS, pick=st.none() | st.integers(-3, 3))
def test_subnet_config_from_json_file_loads_or_refuses(content, pick):
    with fresh_folder() as d:
        path = write(d / "cfg.json", content)
        before = snapshot(d)
        cfg = loads_or_refuses(SubnetConfig.from_json, path, pick)
        if isinstance(cfg, HwnasError):
            assert str(path) in str(cfg)
        assert snapshot(d) == before


@SETTINGS
@given(config=st.dictionaries(st.sampled_from([*MODEL, "head_dim", "model_type"]),
                              st.integers(-2, 300) | SCALARS | st.sampled_from([0, 2 ** 40, 6e16, 1e400, "64"]),
                              max_size=8).map(lambda d: {**MODEL, **d}),
       mlp_step=st.integers(-2, 300) | st.sampled_from([1, 64, 10 ** 30]))
def test_a_model_config_gives_a_space_and_signature_or_refuses(config, mlp_step):
    space = loads_or_refuses(SearchSpace.from_hf_config, config, mlp_step=mlp_step)
    if isinstance(space, SearchSpace):
        assert space.max_config().num_layers == space.num_layers
    loads_or_refuses(model_signature, config)


# ------------------------------------------------------------------------------- pareto.json, --pick
CALIBRATIONS = st.sampled_from(["lambada+coqa-calibration-16x256", "lambada-calibration-8x128",
                                "lambada-calibration-" + "1" * 5000 + "x1"]) | st.text(max_size=12) | JSON


@st.composite
def paretos(draw: st.DrawFn) -> Any:
    member = st.fixed_dictionaries({"config": VALID_CONFIGS | subnet_dicts() | JSON},
                                   optional={"kl": st.floats(0, 5) | SCALARS, "latency_ms": SCALARS})
    pareto: dict[str, Any] = {"front": draw(st.lists(member | JSON, max_size=4) | JSON)}
    if draw(st.booleans()):
        pareto["calibration"] = draw(CALIBRATIONS)
    if draw(st.integers(0, 3)) == 0:
        pareto["selected"] = draw(member | JSON)
    return draw(st.just(pareto) | st.just(pareto) | JSON)


@SETTINGS
@given(pareto=paretos(), pick=st.none() | st.integers(-6, 6))
def test_pareto_json_and_pick_load_or_refuse(pareto, pick):
    with fresh_folder() as d:
        path = write(d / "pareto.json", json.dumps(pareto))
        result = loads_or_refuses(read_subnet, path, pick)
        front = pareto.get("front") if isinstance(pareto, dict) else None
        if pick is not None and isinstance(front, list) and front and not 0 <= pick < len(front):
            # a negative pick is refused rather than taken as a Python index from the end
            assert isinstance(result, HwnasError)
            assert f"--pick {pick} is out of range; expected 0..{len(front) - 1}" in str(result)
        if not isinstance(result, HwnasError):
            cfg, calibration = result
            assert isinstance(cfg, SubnetConfig) and (calibration is None) == ("front" not in pareto)


def run_cli(*argv: str) -> tuple[int, str, str]:
    """`hwnas ARGV` in this process: (exit code, stdout, stderr); argparse's own refusals exit 2 too."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def check_cli(code: int, out: str, err: str) -> None:
    """Success prints JSON; a refusal exits 2 with an `hwnas: error:` line (argparse's: `hwnas CMD: error:`)."""
    assert code in (0, 2), (code, err)
    if code == 0:
        json.loads(out)
    else:
        assert re.search(r"^hwnas( [a-z-]+)?: error: \S", err, re.M) and out == "", err


@SETTINGS
@given(pareto=paretos(), pick=st.integers(max_value=-1) | st.integers(min_value=5))
def test_cli_export_refuses_a_pick_outside_the_front_and_writes_nothing(pareto, pick, tiny_model):
    with fresh_folder() as d:
        subnet = write(d / "pareto.json", json.dumps(pareto))
        before = snapshot(d)
        code, out, err = run_cli("export", "--model", str(tiny_model), "--subnet", str(subnet), "--pick", str(pick),
                                 "--out", str(d / "out"))
        check_cli(code, out, err)
        assert code == 2 and snapshot(d) == before


@pytest.mark.parametrize("pick", [-1, -2, 2, 10])
def test_export_names_the_pick_and_the_valid_range(pick, tiny_model, tmp_path):
    front = [{"kl": 0.2, "config": SPACE.sample(1).to_dict()}, {"kl": 0.1, "config": SPACE.sample(2).to_dict()}]
    subnet = write(tmp_path / "pareto.json", json.dumps({"calibration": "lambada+coqa-calibration-16x256",
                                                         "front": front}))
    code, out, err = run_cli("export", "--model", str(tiny_model), "--subnet", str(subnet), "--pick", str(pick),
                             "--out", str(tmp_path / "out"))
    assert code == 2 and out == "" and not (tmp_path / "out").exists()
    assert err.strip() == f"hwnas: error: {subnet}: --pick {pick} is out of range; expected 0..1 (the front has " \
                          "2 members)"


# ---------------------------------------------------------------------------------- latency tables
def synthetic_table() -> dict[str, Any]:
    """A complete table of the tiny space: 1 ms per 64 MLP channels, 0.5 ms per head, and 4 calibration
    sub-networks per phase on an affine correction."""
    phases = {"prefill": [16], "decode": [8]}
    cost = {"mlp": lambda b: b.width / 64, "attn": lambda b: 0.5 * b.heads, "embed": lambda b: 0.1,
            "head": lambda b: 3.0}
    entries = {b.key: {"mean_ms": cost[b.kind](b), "std_ms": 0.0, "median_ms": cost[b.kind](b), "n": 10}
               for b in blocks_for(SPACE, phases)}
    cal = []
    for i in range(4):
        cfg = SPACE.sample(100 + i)
        for phase, (t,) in phases.items():
            m = 0.8 * sum(entries[b.key]["median_ms"] for b in blocks_of(cfg, phase, t)) + 0.3 * cfg.depth + 2.0
            cal.append({"config": cfg.to_dict(), "phase": phase_key(phase, t),
                        "measured": {"mean_ms": m, "std_ms": 0.1, "median_ms": m, "n": 10}})
    header = {"model": "tiny", "model_signature": SIG, "tie_word_embeddings": True, "runtime": "onnxruntime",
              "precision": "fp32", "device": {"kind": "cpu", "id": "cpu-test", "threads": 2}, "phases": phases,
              "complete": True, "warmup": 1, "repeats": 5, "quantization": {}, "max_position_embeddings": 256}
    return {"format": TABLE_FORMAT, "header": header, "entries": entries, "calibration": cal}


TABLE = synthetic_table()
_DELETE = object()


def json_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside `node` (dict keys and list indices)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    return [prefix] + [p for k, v in items for p in json_paths(v, prefix + (k,))]


def mutate(doc: Any, edits: list[tuple[tuple, Any]]) -> Any:
    """`doc` with each path replaced by its value (or deleted); a path an earlier edit removed is skipped."""
    doc = copy.deepcopy(doc)
    for path, value in edits:
        if not path:
            doc = None if value is _DELETE else value
            continue
        node = doc
        try:
            for k in path[:-1]:
                node = node[k]
            if value is _DELETE:
                del node[path[-1]]
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    return doc


def edits_of(doc: Any) -> st.SearchStrategy:
    value = JSON | st.just(_DELETE) | st.sampled_from([0, -1, 1.5, 1e308, 10 ** 400, "inf", True, None, [], {}])
    return st.lists(st.tuples(st.sampled_from(json_paths(doc)), value), min_size=1, max_size=3)


def use_table(path: Path, subnet: Path) -> None:
    """What loading a table leads to: the predictor with its fitted corrections, latency, size, target checks."""
    p = loads_or_refuses(LatencyPredictor.load, path)
    if isinstance(p, HwnasError):
        return
    cfg = SPACE.sample(7)
    for phase in PHASES:
        loads_or_refuses(p.latency_ms, cfg, phase)
    loads_or_refuses(p.bytes, cfg)
    loads_or_refuses(p.table.check_model, SIG)
    loads_or_refuses(p.table.check_target, runtime="onnxruntime", precision="fp32", device_id="cpu-test")
    loads_or_refuses(predict, table=path, subnet=subnet)


@SETTINGS
@given(edits=edits_of(TABLE))
def test_a_latency_table_with_garbage_fields_loads_or_refuses(edits):
    with fresh_folder() as d:
        table = write(d / "table.json", json.dumps(mutate(TABLE, edits)))
        subnet = write(d / "cfg.json", json.dumps(SPACE.sample(3).to_dict()))
        before = snapshot(d)
        use_table(table, subnet)
        assert snapshot(d) == before


@SETTINGS
@given(content=st.binary(max_size=200) | JSON.map(json.dumps) | st.sampled_from(NASTY_TEXTS)
       | st.integers(0, 2000).map(lambda n: json.dumps(TABLE)[:n]))
def test_a_latency_table_file_of_any_bytes_loads_or_refuses(content):
    with fresh_folder() as d:
        use_table(write(d / "table.json", content), write(d / "cfg.json", json.dumps(SPACE.sample(3).to_dict())))


def test_the_synthetic_table_loads():
    """The base the garbage tests mutate is itself valid, so their refusals come from the garbage."""
    with fresh_folder() as d:
        out = predict(table=write(d / "t.json", json.dumps(TABLE)), subnet=write(d / "c.json", json.dumps(
            SPACE.sample(3).to_dict())))
    assert out["corrections"]["decode.c8"]["form"] != "sum" and out["bytes"] > 0


# ------------------------------------------------------------------------------------ search state
ENCODER = GeneEncoder(SPACE)
STATE_CONFIGS = list(dict.fromkeys(SPACE.sample(s) for s in range(8)))[:4]
ARGS = {"model": "/models/tiny", "table": "/tables/t.json", "algorithm": "nsga2", "evaluations": 8, "population": 4,
        "latency_budget": None, "latency_ratio": 0.8, "size_budget": None, "phase": "decode", "seed": 0,
        "sequences": 2, "seq_len": 32, "calibration": "lambada+coqa-calibration-2x32"}
STATE = {
    "kind": "hwnas-search-state", "format": 1, "args": ARGS, "generation": 1,
    "evaluations": [{"config": c.to_dict(), "quality": 0.1 * i, "latency_ms": 1.0 + i, "size_bytes": 1000.0 + i,
                     "generation": 0} for i, c in enumerate(STATE_CONFIGS)],
    "algorithm": {"name": "nsga2", "n_iter": 1, "rng": rng_state(np.random.default_rng(0)),
                  "population": {"X": [ENCODER.encode(c).tolist() for c in STATE_CONFIGS],
                                 "F": [[0.1 * i, 1.0 + i, 1000.0 + i] for i in range(4)], "G": [[-1.0]] * 4,
                                 "rank": [0, 0, 0, 0], "crowding": ["inf", 1.0, 0.5, "inf"]}},
}
LINAS_ARGS = {**ARGS, "algorithm": "linas"}
LINAS_STATE = {**STATE, "args": LINAS_ARGS, "algorithm": LinasState(0, [2, 0, 3, 1]).to_dict("linas")}


def resume(folder: Path, args: dict[str, Any]) -> Any:
    """Every check `hwnas search --resume` makes of state.json, without loading the model."""
    from pymoo.core.problem import Problem
    from pymoo.core.termination import NoTermination

    from hwnas.search import nsga2

    f = StateFile(folder)
    f.read(args)
    f.rows(ENCODER, args["evaluations"])
    if args["algorithm"] == "linas":
        f.linas(SPACE.num_layers, 0)
        return
    lo, hi = ENCODER.bounds
    problem = Problem(n_var=ENCODER.n_var, n_obj=3, n_ieq_constr=1, xl=lo, xu=hi, vtype=int)
    algo = nsga2(4, np.tile(hi, (4, 1))).setup(problem, termination=NoTermination(), seed=0)
    f.restore_nsga2(algo, ENCODER, 1)
    return algo


def resume_loads_or_refuses(content: str | bytes, args: dict[str, Any]) -> None:
    with fresh_folder() as d:
        path = write(d / "state.json", content)
        before = snapshot(d)
        e = loads_or_refuses(resume, d, args)
        if isinstance(e, HwnasError):
            assert str(path) in str(e) or str(e).startswith("cannot resume: "), str(e)
        assert snapshot(d) == before


def test_a_restored_nsga2_takes_a_generation_after_its_mating_ran_dry():
    from pymoo.core.population import Population

    with fresh_folder() as d:
        write(d / "state.json", json.dumps(STATE))
        algo = resume(d, ARGS)
    algo.termination.force_termination = True  # what pymoo's mating does when every offspring is a duplicate
    lo, _ = ENCODER.bounds
    pop = Population.new("X", np.tile(lo, (4, 1)))
    pop.set("F", np.ones((4, 3)), "G", -np.ones((4, 1)))
    algo.tell(infills=pop)  # finalizes, which reads the start time a fresh run's first ask sets
    assert algo.n_iter == STATE["algorithm"]["n_iter"] + 1


@pytest.mark.parametrize("state, args", [(STATE, ARGS), (LINAS_STATE, LINAS_ARGS)])
def test_the_synthetic_state_loads(state, args):
    with fresh_folder() as d:
        write(d / "state.json", json.dumps(state))
        resume(d, args)


@SETTINGS
@given(content=st.binary(max_size=300) | JSON.map(json.dumps) | st.sampled_from(NASTY_TEXTS)
       | st.integers(0, len(json.dumps(STATE))).map(lambda n: json.dumps(STATE)[:n])
       | st.tuples(st.integers(0, len(json.dumps(STATE)) - 1), st.binary(min_size=1, max_size=1)).map(
           lambda t: json.dumps(STATE).encode()[:t[0]] + t[1] + json.dumps(STATE).encode()[t[0] + 1:]))
def test_a_state_file_of_any_bytes_or_truncated_resumes_or_refuses(content):
    resume_loads_or_refuses(content, ARGS)


@SETTINGS
@given(edits=edits_of(STATE), linas_edits=edits_of(LINAS_STATE), which=st.booleans())
def test_a_state_with_wrong_types_or_versions_resumes_or_refuses(edits, linas_edits, which):
    state, args = (mutate(STATE, edits), ARGS) if which else (mutate(LINAS_STATE, linas_edits), LINAS_ARGS)
    resume_loads_or_refuses(json.dumps(state), args)


@SETTINGS
@given(version=JSON.filter(lambda v: not (type(v) is int and v == 1)))
def test_a_state_of_another_format_version_is_refused(version):
    with fresh_folder() as d:
        write(d / "state.json", json.dumps({**STATE, "format": version}))
        with pytest.raises(HwnasError, match=r"format is .*; expected format 1|non-standard constant"):
            resume(d, ARGS)


# ------------------------------------------------------------------------------ CLI numbers, paths
NUMBERS = st.one_of(st.integers(-3, 300).map(str), st.integers().map(str), st.floats().map(str),
                    st.text(max_size=8), st.sampled_from(["0", "-1", "1e3", "0x10", "64.0", " 64", "--", "nan"]))
# relative names only, so nothing lands outside the example's folder
SEGMENT = st.text(alphabet="abc._- ", min_size=1, max_size=10).filter(lambda s: s not in (".", ".."))
OUT_NAMES = st.lists(SEGMENT, min_size=1, max_size=3).map("/".join) | st.sampled_from(
    ["existing.json", "existing_dir", "existing.json/x.json", "x" * 300, ".", "existing_dir/"])


@SETTINGS
@given(mlp_step=NUMBERS)
def test_cli_space_numbers_succeed_or_exit_2(mlp_step, tiny_model):
    check_cli(*run_cli("space", "--model", str(tiny_model), "--mlp-step", mlp_step))


@SETTINGS
@given(seed=NUMBERS, mlp_step=NUMBERS | st.just("64"), out=OUT_NAMES)
def test_cli_sample_numbers_and_paths_succeed_or_exit_2_writing_nothing(seed, mlp_step, out, tiny_model):
    with fresh_folder() as d:
        write(d / "existing.json", "{}")
        (d / "existing_dir").mkdir()
        before = snapshot(d)
        code, stdout, stderr = run_cli("sample", "--model", str(tiny_model), "--seed", seed, "--mlp-step", mlp_step,
                                       "--out", str(d / out))
        check_cli(code, stdout, stderr)
        after = snapshot(d)
        target = str((d / out).relative_to(d))
        folders_to_it = {str(p) for p in Path(target).parents}  # made for the output
        changed = {k for k in after if after[k] != before.get(k)}
        if code == 0:  # only the config file changed
            assert changed <= {target} | folders_to_it
            SubnetConfig.from_json(d / out)
        else:  # nothing written: no file or folder new or changed
            assert not changed, changed


IN_NAMES = st.sampled_from(["table.json", "cfg.json", "missing.json", "folder", "garbage.json", "x" * 300,
                             "table.json/x", ""])


@SETTINGS
@given(tokens=NUMBERS | st.just("8"), table=IN_NAMES | st.just("table.json"), subnet=IN_NAMES | st.just("cfg.json"))
def test_cli_predict_numbers_and_paths_succeed_or_exit_2(tokens, table, subnet):
    with fresh_folder() as d:
        write(d / "table.json", json.dumps(TABLE))
        write(d / "cfg.json", json.dumps(SPACE.sample(3).to_dict()))
        write(d / "garbage.json", b"\x00\xff{")
        (d / "folder").mkdir()
        before = snapshot(d)
        check_cli(*run_cli("predict", "--table", str(d / table), "--subnet", str(d / subnet), "--tokens", tokens))
        assert snapshot(d) == before
