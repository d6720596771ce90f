"""A search's resumable state, `OUT/state.json`: plain JSON data, never pickle.

Search folders are handed between machines and people, so loading one must not run code. The file holds the
arguments, every evaluated sub-network and the algorithm's state as numbers (NSGA-II's population with its rank
and crowding, and each algorithm's random generator), and every value is checked before the search uses it.
Non-finite numbers are written as the strings "inf", "-inf" and "nan", so the file is strict JSON.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, NoReturn, Sequence

import numpy as np

from .common import HwnasError, atomic_write_text
from .encoding import GeneEncoder
from .space import SubnetConfig

KIND = "hwnas-search-state"
FORMAT = 1
STATE = "state.json"
PICKLED = "state.pkl"  # what earlier versions wrote: refused, never loaded
NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def number(x: float) -> float | str:
    """`x` as a JSON value: a float, or "inf", "-inf" or "nan"."""
    x = float(x)
    return x if math.isfinite(x) else repr(x)


def is_number(v: Any) -> bool:
    """Whether `v` is a number as `number` writes it."""
    return type(v) in (int, float) or isinstance(v, str) and v in NON_FINITE


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return dict(rng.bit_generator.state)


class LinasState:
    """What LINAS carries between iterations; random search uses only its `rng`."""

    def __init__(self, seed: int, layer_order: Sequence[int] | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.iteration = 0
        self.layer_order = layer_order

    def to_dict(self, name: str) -> dict[str, Any]:
        return {"name": name, "rng": rng_state(self.rng), "iteration": self.iteration,
                "layer_order": None if self.layer_order is None else [int(i) for i in self.layer_order]}


def nsga2_state(algo: Any) -> dict[str, Any]:
    """A set-up pymoo NSGA-II after at least one `tell`: its population, generation counter and generator."""
    pop = algo.pop
    return {"name": "nsga2", "n_iter": int(algo.n_iter), "rng": rng_state(algo.random_state),
            "population": {"X": [np.asarray(ind.X).tolist() for ind in pop],
                           "F": [[number(v) for v in ind.F] for ind in pop],
                           "G": [[number(v) for v in ind.G] for ind in pop],
                           "rank": [None if (r := ind.get("rank")) is None else int(r) for ind in pop],
                           "crowding": [None if (c := ind.get("crowding")) is None else number(c) for ind in pop]}}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class StateFile:
    """`OUT/state.json`: written atomically after every generation; read back with every value checked."""

    def __init__(self, out: Path) -> None:
        self.path = out / STATE
        self.pickled = out / PICKLED
        self.data: dict[str, Any] = {}

    def exists(self) -> bool:
        return self.path.exists()

    def refuse_pickle(self) -> None:
        if self.pickled.exists():
            raise HwnasError(f"{self.pickled} was written by an earlier hwnas with pickle, which is unsafe to load; "
                             f"start a new search in another --out or delete it")

    def write(self, *, args: dict[str, Any], generation: int, rows: list[dict[str, Any]],
              algorithm: dict[str, Any]) -> None:
        data = {"kind": KIND, "format": FORMAT, "args": args, "generation": generation, "algorithm": algorithm,
                "evaluations": [{**r, **{k: number(r[k]) for k in ("quality", "latency_ms", "size_bytes")}}
                                for r in rows]}
        atomic_write_text(self.path, json.dumps(data, separators=(",", ":"), allow_nan=False) + "\n")

    # ------------------------------------------------------------------------------------------ reading
    def fail(self, what: str, expected: str) -> NoReturn:
        raise HwnasError(f"search state {self.path}: {what}; expected {expected}")

    def field(self, d: dict[str, Any], key: str, kind: type, where: str, expected: str) -> Any:
        """`d[key]`, which must be a `kind` (int, list or dict; true and false are not integers)."""
        if key not in d:
            self.fail(f"{where}{key} is missing", expected)
        v = d[key]
        if not isinstance(v, kind) or isinstance(v, bool):
            self.fail(f"{where}{key} is {_short(v)}", expected)
        return v

    def integer(self, d: dict[str, Any], key: str, where: str = "", low: int = 0) -> int:
        v = self.field(d, key, int, where, f"an integer >= {low}")
        if v < low:
            self.fail(f"{where}{key} is {v}", f"an integer >= {low}")
        return v

    def num(self, v: Any, where: str) -> float:
        if not is_number(v) or type(v) is int and abs(v) > 1 << 1000:  # float() would overflow
            self.fail(f"{where} is {_short(v)}", 'a number (or "inf", "-inf", "nan")')
        return NON_FINITE[v] if isinstance(v, str) else float(v)

    def read(self, args: dict[str, Any]) -> int:
        """Parse the file and check its kind, format, structure and that it was written with `args`; the
        generation it stopped after. The rows and the algorithm are checked against the space later."""
        try:
            data = json.loads(self.path.read_bytes().decode("utf-8"), parse_constant=self._constant)
        except HwnasError:
            raise
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self.fail(f"not valid JSON ({' '.join(str(e).split())[:120]})",
                      f"a JSON {KIND} written by hwnas search (format {FORMAT})")
        if not isinstance(data, dict) or data.get("kind") != KIND:
            self.fail(f"not a {KIND}", f'a JSON object with "kind": "{KIND}" and "format": {FORMAT}')
        if type(data.get("format")) is not int or data["format"] != FORMAT:
            self.fail(f"format is {_short(data.get('format'))}", f"format {FORMAT}; start a new search with this hwnas")
        saved = self.field(data, "args", dict, "", "the search's arguments as an object")
        diff = {k: (saved.get(k), v) for k, v in args.items() if saved.get(k) != v}
        if diff:
            raise HwnasError("cannot resume: " + ", ".join(f"{k} was {_short(a)}, now {_short(b)}"
                                                           for k, (a, b) in diff.items()))
        generation = self.integer(data, "generation")
        self.field(data, "evaluations", list, "", "a list of evaluated sub-networks")
        algo = self.field(data, "algorithm", dict, "", "the algorithm's state as an object")
        if algo.get("name") != args["algorithm"]:
            self.fail(f"algorithm.name is {_short(algo.get('name'))}", repr(args["algorithm"]))
        self.data = data
        return generation

    def _constant(self, name: str) -> NoReturn:
        self.fail(f"holds the non-standard constant {name}", 'strict JSON ("inf", "-inf" and "nan" as strings)')

    def rows(self, encoder: GeneEncoder, budget: int) -> list[dict[str, Any]]:
        """The evaluated sub-networks, in order, each a config of `encoder`'s space with its numbers."""
        rows, seen = self.data["evaluations"], set()
        if len(rows) > budget:
            self.fail(f"{len(rows)} evaluations", f"at most the search's budget, {budget}")
        out = []
        for i, r in enumerate(rows):
            where = f"evaluations[{i}]."
            if not isinstance(r, dict) or set(r) != {"config", "quality", "latency_ms", "size_bytes", "generation"}:
                self.fail(f"evaluations[{i}] is {_short(r)}",
                          "an object with config, quality, latency_ms, size_bytes and generation")
            try:
                cfg = encoder.space.validate(SubnetConfig.from_dict(r["config"]))
                encoder.encode(cfg)  # a config this search's genes can hold (precision genes included)
            except (HwnasError, TypeError, ValueError, KeyError, IndexError, OverflowError) as e:
                self.fail(f"{where}config does not fit this search space ({' '.join(str(e).split())[:160]})",
                          "configs of the model being searched")
            if cfg in seen:
                self.fail(f"{where}config repeats an earlier evaluation", "each sub-network evaluated once")
            seen.add(cfg)
            out.append({"config": cfg, "generation": self.integer(r, "generation", where),
                        **{k: self.num(r[k], where + k) for k in ("quality", "latency_ms", "size_bytes")}})
        return out

    def rng(self, state: dict[str, Any], rng: np.random.Generator, where: str) -> None:
        """Set `rng` (a PCG64 generator) to the saved `state`."""
        bits = state.get("state") if isinstance(state, dict) else None
        expected = ('{"bit_generator": "PCG64", "state": {"state": int, "inc": int}, "has_uint32": 0 or 1, '
                    '"uinteger": int}')
        ok = (isinstance(state, dict) and state.get("bit_generator") == "PCG64" and isinstance(bits, dict)
              and set(bits) == {"state", "inc"} and state.get("has_uint32") in (0, 1)
              and type(state["has_uint32"]) is int
              and all(type(v) is int and 0 <= v < 1 << 128 for v in (bits["state"], bits["inc"]))
              and type(state.get("uinteger")) is int and 0 <= state["uinteger"] < 1 << 32)
        if not ok:
            self.fail(f"{where} is {_short(state)}", expected)
        try:
            rng.bit_generator.state = state
        except (TypeError, ValueError, KeyError, OverflowError) as e:
            self.fail(f"{where} is refused by numpy ({e})", expected)

    def linas(self, num_layers: int, seed: int) -> LinasState:
        """LINAS's (or random search's) state: its generator, iteration and layer order."""
        algo = self.data["algorithm"]
        state = LinasState(seed)
        self.rng(self.field(algo, "rng", dict, "algorithm.", "a generator state"), state.rng, "algorithm.rng")
        state.iteration = self.integer(algo, "iteration", "algorithm.")
        order = algo.get("layer_order")
        if order is not None and (not isinstance(order, list) or any(type(i) is not int for i in order)
                                  or sorted(order) != list(range(num_layers))):
            self.fail(f"algorithm.layer_order is {_short(order)}",
                      f"null or an ordering of the layers 0..{num_layers - 1}")
        state.layer_order = order
        return state

    def restore_nsga2(self, algo: Any, encoder: GeneEncoder, n_constr: int) -> None:
        """Put the saved population, rank and crowding, generation counter and generator into `algo`, a pymoo
        NSGA-II set up for this search but not yet asked: it then proposes what the interrupted run would have."""
        from pymoo.core.population import Population

        d = self.data["algorithm"]
        n_iter = self.integer(d, "n_iter", "algorithm.", low=1)
        pop = self.field(d, "population", dict, "algorithm.", "an object of X, F, G, rank and crowding")
        X = self.field(pop, "X", list, "algorithm.population.", "a list of gene vectors")
        if not 1 <= len(X) <= algo.pop_size:
            self.fail(f"algorithm.population has {len(X)} members", f"1 to {algo.pop_size}")
        lo, hi = encoder.bounds
        genes = [self.genes(x, lo, hi, f"algorithm.population.X[{i}]") for i, x in enumerate(X)]
        F = self.matrix(pop, "F", len(X), 3)
        G = self.matrix(pop, "G", len(X), n_constr)
        rank = self.column(pop, "rank", len(X), lambda v: type(v) is int and v >= 0, "null or an integer >= 0")
        crowding = self.column(pop, "crowding", len(X), is_number, 'null or a number (or "inf", "-inf", "nan")')
        unranked = [i for i, g in enumerate(G) if (g <= 0).all() and (rank[i] is None or crowding[i] is None)]
        if unranked:  # survival ranks every feasible member; the tournament compares their crowding
            self.fail(f"feasible member {unranked[0]} of algorithm.population has no rank or crowding",
                      "a rank and a crowding distance for every member that meets the budgets")
        p = Population.new("X", genes)
        p.set("F", F)
        if n_constr:
            p.set("G", G)
        for ind, r, c in zip(p, rank, crowding):
            if r is not None:
                ind.set("rank", r)
            if c is not None:
                ind.set("crowding", self.num(c, "crowding"))
        self.rng(self.field(d, "rng", dict, "algorithm.", "a generator state"), algo.random_state, "algorithm.rng")
        algo.pop, algo.n_iter, algo.is_initialized = p, n_iter, True
        # what pymoo's own first ask sets: a later tell finalizes with it once mating runs dry (force_termination)
        algo.start_time = time.time()

    def genes(self, x: Any, lo: np.ndarray, hi: np.ndarray, where: str) -> np.ndarray:
        ok = (isinstance(x, list) and len(x) == len(lo)
              and all(type(v) in (int, float) and a <= v <= b and v == int(v)
                      for v, a, b in zip(x, lo.tolist(), hi.tolist())))
        if not ok:
            self.fail(f"{where} is {_short(x)}", f"{len(lo)} whole numbers within {lo.tolist()}..{hi.tolist()}")
        return np.array(x)

    def matrix(self, pop: dict[str, Any], key: str, rows: int, cols: int) -> np.ndarray:
        where = f"algorithm.population.{key}"
        M = self.field(pop, key, list, "algorithm.population.", f"{rows} rows of {cols} numbers")
        if len(M) != rows or any(not isinstance(r, list) or len(r) != cols for r in M):
            self.fail(f"{where} has the wrong shape", f"{rows} rows of {cols} numbers")
        return np.array([[self.num(v, where) for v in r] for r in M], dtype=float).reshape(rows, cols)

    def column(self, pop: dict[str, Any], key: str, rows: int, ok: Any, expected: str) -> list[Any]:
        col = self.field(pop, key, list, "algorithm.population.", f"a list of {rows}")
        if len(col) != rows:
            self.fail(f"algorithm.population.{key} has {len(col)} entries", f"{rows}")
        for v in col:
            if v is not None and not ok(v):
                self.fail(f"algorithm.population.{key} holds {_short(v)}", expected)
        return col
