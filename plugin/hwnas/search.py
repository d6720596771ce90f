"""Multi-objective search over the supernet: quality loss against predicted latency and size.

The search knows three callables, as in Once-for-All: `quality(cfg)` (`quality.KLQuality`), `latency(cfg)` (a
`LatencyPredictor`) and `size(cfg)` (bytes at the target precision). Sub-networks are integer gene vectors
(`encoding.GeneEncoder`). Budgets are pymoo constraints. Algorithms, all held to the same number of real
quality evaluations:
- `nsga2`: pymoo NSGA-II, every candidate evaluated for real;
- `linas`: LINAS (DyNAS-T): evaluate a population, fit a quality predictor on everything evaluated so far, run an
  inner NSGA-II on the predictor for thousands of cheap evaluations, evaluate that front for real, repeat;
- `random`: distinct random sub-networks, the baseline.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .common import HwnasError, prepare_output
from .defaults import CALIBRATION_SOURCE, DEFAULT_MODEL, EVALUATIONS, POPULATION, SELECT, SELECT_METRIC
from .encoding import GeneEncoder, config_features, shrunk_genes, shrunk_to
from .loading import model_key, read_llama_config, resolve_model
from .parallel import RayQuality
from .predictor import LatencyPredictor
from .pruning import layer_drop, least_influential, structured_seeds, width_uniform
from .quality import quality_context
from .search_report import write_outputs
from .search_state import LinasState, StateFile, nsga2_state
from .selection import ITEMS as SELECT_ITEMS, METRICS, check_metric, select as select_winner
from .space import SubnetConfig
from .elastic import OrtInt8
from .supernet import Calibration
from .tables import model_signature

log = logging.getLogger(__name__)
ALGORITHMS = ("nsga2", "linas", "random")


@dataclasses.dataclass
class Objectives:
    """The search's view of a sub-network: three callables and the budgets (None: no budget)."""

    quality: Callable[[SubnetConfig], float]
    latency: Callable[[SubnetConfig], float]
    size: Callable[[SubnetConfig], float]
    latency_budget: float | None = None
    size_budget: float | None = None

    def constraints(self, lat: float, size: float) -> list[float]:
        g = []
        if self.latency_budget is not None:
            g.append(lat - self.latency_budget)
        if self.size_budget is not None:
            g.append(size - self.size_budget)
        return g

    def meets(self, e: Evaluated) -> bool:
        """Whether an evaluated sub-network meets every budget."""
        return all(g <= 0 for g in self.constraints(e.latency_ms, e.size_bytes))


def check_budgets(encoder: GeneEncoder, obj: Objectives) -> None:
    """Refuse budgets no sub-network meets, naming the smallest achievable latency and size."""
    smallest = encoder.space.min_config()
    lat, size = obj.latency(smallest), obj.size(smallest)
    if obj.latency_budget is not None and obj.latency_budget < lat:
        raise HwnasError(f"latency budget {obj.latency_budget:.3f} ms is below the smallest achievable, {lat:.3f} ms")
    if obj.size_budget is not None and obj.size_budget < size:
        raise HwnasError(f"size budget {obj.size_budget / 1e6:.1f} MB is below the smallest achievable, "
                         f"{size / 1e6:.1f} MB")


# ------------------------------------------------------------------------------------- the loop
@dataclasses.dataclass
class Evaluated:
    config: SubnetConfig
    quality: float
    latency_ms: float
    size_bytes: float
    generation: int

    def objectives(self) -> list[float]:
        return [self.quality, self.latency_ms, self.size_bytes]

    def to_dict(self) -> dict[str, Any]:
        """As the search state stores it; `Evaluated(**row)` reads back `StateFile.rows`."""
        return {"config": self.config.to_dict(), "quality": self.quality, "latency_ms": self.latency_ms,
                "size_bytes": self.size_bytes, "generation": self.generation}


class Evaluator:
    """Evaluates gene vectors, each distinct sub-network once, counting real quality evaluations.

    `map_quality` evaluates a list of configs (in order); it is where Ray spreads the work.
    """

    def __init__(self, encoder: GeneEncoder, obj: Objectives, budget: int,
                 map_quality: Callable[[list[SubnetConfig]], list[float]] | None = None) -> None:
        self.encoder, self.obj, self.budget = encoder, obj, budget
        self.map_quality = map_quality or (lambda cfgs: [obj.quality(c) for c in cfgs])
        self.done: dict[SubnetConfig, Evaluated] = {}
        self.order: list[Evaluated] = []

    @property
    def used(self) -> int:
        return len(self.order)

    def evaluate(self, X: np.ndarray, generation: int) -> tuple[np.ndarray, np.ndarray]:
        """F (n, 3) and G (n, n_constr) for gene rows X; rows past the budget get infinite objectives."""
        cfgs = [self.encoder.decode(x) for x in X]
        new = []
        for c in cfgs:
            if c not in self.done and c not in new and self.used + len(new) < self.budget:
                new.append(c)
        for c, q in zip(new, self.map_quality(new)):
            self.add(Evaluated(c, float(q), float(self.obj.latency(c)), float(self.obj.size(c)), generation))
        F, G = [], []
        n_g = len(self.obj.constraints(0.0, 0.0))
        for c in cfgs:
            e = self.done.get(c)
            if e is None:  # over budget: never selected
                F.append([np.inf] * 3)
                G.append([np.inf] * n_g)
            else:
                F.append(e.objectives())
                G.append(self.obj.constraints(e.latency_ms, e.size_bytes))
        return np.array(F, dtype=float), np.array(G, dtype=float).reshape(len(cfgs), n_g)

    def add(self, e: Evaluated) -> None:
        self.done[e.config] = e
        self.order.append(e)

    def feasible(self) -> list[Evaluated]:
        return [e for e in self.order if self.obj.meets(e)]


def seed_genes(encoder: GeneEncoder, obj: Objectives, layer_order: Sequence[int] | None) -> list[np.ndarray]:
    """`pruning.structured_seeds` under the latency budget, as genes (dropped layers' MLP genes at the seed's
    width too). Seeding the search with them means its front is never behind these baselines."""
    if obj.latency_budget is None or not layer_order:
        return []
    L, out = encoder.space.num_layers, []
    for cfg in structured_seeds(encoder.space, layer_order, latency=obj.latency, budget=obj.latency_budget):
        x = encoder.encode(cfg)
        x[L:2 * L] = encoder.space.mlp_choices.index(cfg.mlp[0])
        out.append(x)
    return out


def initial_population(encoder: GeneEncoder, obj: Objectives, n: int, rng: np.random.Generator,
                       layer_order: Sequence[int] | None = None) -> np.ndarray:
    """Starting genes: structured-pruning seeds under the budget, then genes from the full model down to the smallest.

    Uniformly random genes drop half the layers, where every sub-network of a dense model is poor, so a short
    search never reaches the region users want. Up to half the population are `seed_genes`; each other
    individual shrinks every gene by its own random share of an intensity t (t = 0: the full model); with a
    budget, half of those take the t that puts their predicted latency at 90-100% of it (`shrunk_to`, no
    quality evaluation), the rest a uniform t, so the whole latency range stays covered.
    """
    seeds = seed_genes(encoder, obj, layer_order)
    if len(seeds) > n // 2:
        seeds = [seeds[i] for i in np.unique(np.round(np.linspace(0, len(seeds) - 1, n // 2)).astype(int))]
    X = list(seeds)
    for i in range(n - len(seeds)):
        u = rng.random(encoder.n_var)
        t = float(rng.random())
        if obj.latency_budget is not None and i % 2 == 0:
            X.append(shrunk_to(encoder, obj.latency, u, obj.latency_budget * rng.uniform(0.9, 1.0)))
        else:
            X.append(shrunk_genes(encoder, u, t))
    return np.stack(X)


def nsga2(pop_size: int, initial: np.ndarray | None = None) -> Any:
    """pymoo NSGA-II on integer genes (SBX and polynomial mutation, rounded), duplicates eliminated."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling

    return NSGA2(pop_size=pop_size, sampling=IntegerRandomSampling() if initial is None else initial,
                 crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
                 mutation=PM(eta=20, vtype=float, repair=RoundingRepair()), eliminate_duplicates=True)


def fit_quality_predictor(X: np.ndarray, kl: np.ndarray, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """LINAS's quality predictor: the mean of a gradient-boosting and a ridge regressor of log KL (each alone
    ranks held-out sub-networks worse: `benchmarks/search_efficiency.py --parts predictor`)."""
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.linear_model import RidgeCV

    y = np.log(np.asarray(kl, dtype=float) + 0.01)
    boost = GradientBoostingRegressor(n_estimators=200, max_depth=3, learning_rate=0.05, subsample=0.8,
                                      random_state=seed).fit(X, y)
    ridge = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(X, y)
    return lambda F: (boost.predict(F) + ridge.predict(F)) / 2


def linas_step(ev: Evaluator, state: LinasState, pop_size: int, inner_generations: int = 50,
               inner_pop: int = 100, lost: Callable[[SubnetConfig], np.ndarray | None] | None = None) -> int:
    """One LINAS iteration: the first evaluates the initial population; later ones fit a quality predictor
    (`fit_quality_predictor` on `config_features` with what each sub-network cuts in importance, `lost`) on
    everything evaluated, run NSGA-II on it, and evaluate up to `pop_size` new front members."""
    from pymoo.core.problem import Problem
    from pymoo.optimize import minimize

    lo, hi = ev.encoder.bounds
    gen = state.iteration
    if gen == 0 or len(ev.order) < 8:
        X = initial_population(ev.encoder, ev.obj, pop_size, state.rng, state.layer_order)
        before = ev.used
        ev.evaluate(X, gen)
        state.iteration += 1
        return ev.used - before
    enc, obj = ev.encoder, ev.obj

    def features(cfgs: list[SubnetConfig]) -> np.ndarray:
        return np.stack([config_features(enc, c, None if lost is None else lost(c)) for c in cfgs])

    predict = fit_quality_predictor(features([e.config for e in ev.order]), np.array([e.quality for e in ev.order]),
                                    seed=int(state.rng.integers(1 << 31)))
    n_g = len(obj.constraints(0.0, 0.0))

    class Surrogate(Problem):
        def _evaluate(self, X, out, *args, **kwargs):
            cfgs = [enc.decode(x) for x in X]
            q = predict(features(cfgs))
            lat = np.array([obj.latency(c) for c in cfgs])
            size = np.array([obj.size(c) for c in cfgs])
            out["F"] = np.stack([q, lat, size], 1)
            if n_g:
                out["G"] = np.array([obj.constraints(a, b) for a, b in zip(lat, size)])

    inner = Surrogate(n_var=enc.n_var, n_obj=3, n_ieq_constr=n_g, xl=lo, xu=hi, vtype=int)
    algo = minimize(inner, nsga2(inner_pop), ("n_gen", inner_generations), seed=int(state.rng.integers(1 << 31)),
                    copy_algorithm=False).algorithm
    front = algo.opt if algo.opt is not None and len(algo.opt) else algo.pop
    cands, seen = [], set()
    for x in front.get("X"):
        c = enc.decode(x)
        if c not in ev.done and c not in seen:
            seen.add(c)
            cands.append((obj.latency(c), x))
    # spread the picks along the predicted front, not its first members (putting half of them where the
    # predicted KL is lowest found no better sub-network under the budget and lost hypervolume)
    cands.sort(key=lambda t: t[0])
    if len(cands) > pop_size:
        cands = [cands[i] for i in np.unique(np.round(np.linspace(0, len(cands) - 1, pop_size)).astype(int))]
    pick = [x for _, x in cands]
    for x in algo.pop.get("X"):
        if len(pick) >= pop_size:
            break
        c = enc.decode(x)
        if c not in ev.done and c not in seen:
            seen.add(c)
            pick.append(x)
    if len(pick) < pop_size:  # the surrogate's population is exhausted: fill with random genes
        pick += list(state.rng.integers(lo, hi + 1, size=(pop_size - len(pick), enc.n_var)))
    before = ev.used
    ev.evaluate(np.stack(pick), gen)
    state.iteration += 1
    return ev.used - before


# --------------------------------------------------------------------------------- the command
@dataclasses.dataclass
class Setup:
    """What a search (or a baseline, under the same budget) works with."""

    supernet: Any
    config: dict[str, Any]
    predictor: Any
    encoder: GeneEncoder
    objectives: Objectives


def setup(*, model: str, table: str, phase: str = "decode", latency_budget: float | None = None,
          latency_ratio: float | None = None, size_budget: float | None = None, sequences: int = 8,
          seq_len: int = 128, calibration_source: str = CALIBRATION_SOURCE) -> Setup:
    """The supernet, gene encoder and objectives of `model` against `table`, budgets checked.

    Against an onnxruntime int8 table the quality is measured under int8 emulation, with each layer's
    down_proj precision a gene (the table measures both). Weight-only int8 (int8-wo, OpenVINO int8) costs
    little KL, so against those tables the fp32 quality stands for the deployed one. `calibration_source`
    (data.CALIBRATION_SOURCES) is the text that orders the channels and that the KL is measured on.
    """
    config = read_llama_config(resolve_model(model))
    predictor = LatencyPredictor.load(table)
    predictor.table.check_model(model_signature(config))
    sn, quality = quality_context(model, sequences, seq_len, calibration_source)
    mixed = "down_proj" in predictor.table.mixed_precision
    if mixed:
        quality = quality.emulating(OrtInt8.from_settings(predictor.table.header["quantization"]))
    encoder = GeneEncoder(sn.search_space, mixed_precision=mixed)
    lat = lambda c: predictor.latency_ms(c, phase)  # noqa: E731
    size = lambda c: float(predictor.bytes(c))  # noqa: E731
    budget = latency_budget if latency_ratio is None else latency_ratio * lat(sn.search_space.max_config())
    obj = Objectives(quality, lat, size, budget, None if size_budget is None else size_budget * 1e6)
    check_budgets(encoder, obj)
    return Setup(sn, config, predictor, encoder, obj)


def run_search(*, model: str = DEFAULT_MODEL, table: str, algorithm: str = "nsga2", evaluations: int = EVALUATIONS,
               population: int = POPULATION, latency_budget: float | None = None, latency_ratio: float | None = None,
               size_budget: float | None = None, phase: str = "decode", seed: int = 0, workers: int = 1,
               ray_address: str | None = None, resume: bool = False, out: str, sequences: int = 8,
               seq_len: int = 128, select: int = SELECT, select_metric: str = SELECT_METRIC,
               select_items: int = SELECT_ITEMS, calibration_source: str = CALIBRATION_SOURCE,
               progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Search sub-networks of `model` trading KL to the full model against `table`'s predicted latency and size.

    Under a budget, the winner is then chosen by `hwnas.selection` among the `select` best depths and the
    layer-drop and width-uniform baselines' networks (`baseline_rows`), by
    `select_metric` on `select_items` held-out items (0: the lowest-KL feasible sub-network, as the front ranks them).
    """
    from .progress import tqdm

    if algorithm not in ALGORITHMS:
        raise HwnasError(f"algorithm {algorithm!r} is not known; expected one of {list(ALGORITHMS)}")
    if population < 2 or evaluations < population:
        raise HwnasError(f"need population >= 2 and evaluations >= population, got {population} and {evaluations}")
    if latency_budget is not None and latency_ratio is not None:
        raise HwnasError("give --latency-budget or --latency-ratio, not both")
    if latency_ratio is not None and not 0 < latency_ratio <= 1:
        raise HwnasError(f"--latency-ratio must be in (0, 1], got {latency_ratio}")
    if workers < 1:
        raise HwnasError(f"workers must be at least 1, got {workers}")
    if select < 0 or select_items < 1:
        raise HwnasError(f"select must be >= 0 and select_items >= 1, got {select} and {select_items}")
    check_metric(select_metric)  # before the search, not after it
    out = Path(out)
    args = {"model": model_key(model), "table": str(Path(table).resolve()), "algorithm": algorithm, "evaluations": evaluations,
            "population": population, "latency_budget": latency_budget, "latency_ratio": latency_ratio,
            "size_budget": size_budget, "phase": phase, "seed": seed, "sequences": sequences, "seq_len": seq_len,
            "calibration": Calibration(source=calibration_source).key()}  # refuses an unknown source
    if overwrite:
        prepare_output(out, overwrite=True)
    state = StateFile(out)
    state.refuse_pickle()
    if state.exists() and not resume:
        raise HwnasError(f"{out} holds a search; pass --resume to continue it, --overwrite to start again, "
                         "or choose another --out")
    prepare_output(out, overwrite=False, own=state.exists())  # a folder of other files is not a search's
    saved = resume and state.exists()
    if resume and not saved:  # e.g. killed before its first generation was saved: nothing is lost
        log.warning("%s holds no saved search state; starting a new search", out)
    generation = state.read(args) if saved else 0  # before the model loads: a bad file fails fast

    sp = setup(model=model, table=table, phase=phase, latency_budget=latency_budget, latency_ratio=latency_ratio,
               size_budget=size_budget, sequences=sequences, seq_len=seq_len, calibration_source=calibration_source)
    sn, encoder, obj = sp.supernet, sp.encoder, sp.objectives
    full = sn.search_space.max_config()
    parallel = workers > 1 or ray_address is not None  # else serial: no Ray
    ev = Evaluator(encoder, obj, evaluations,
                   RayQuality(sn, obj.quality, workers=workers, address=ray_address) if parallel else None)
    n_constr = len(obj.constraints(0.0, 0.0))
    problem = _problem(encoder, n_constr)
    # least influential layers first (None before the importance calibration: random seeds only)
    layer_order = None if sn.layer_importance is None else least_influential(sn.layer_importance)
    if algorithm == "nsga2":
        from pymoo.core.termination import NoTermination

        initial = initial_population(encoder, obj, population, np.random.default_rng(seed), layer_order)
        algo = nsga2(population, initial).setup(problem, termination=NoTermination(), seed=seed)
    else:
        algo = LinasState(seed, layer_order if algorithm == "linas" else None)
    if saved:
        for row in state.rows(encoder, evaluations):
            ev.add(Evaluated(**row))
        if algorithm == "nsga2":
            state.restore_nsga2(algo, encoder, n_constr)
        else:
            algo = state.linas(sn.search_space.num_layers, seed)
    with tqdm(total=evaluations, initial=ev.used, desc=f"search {algorithm}", unit="eval", disable=not progress) as bar:
        while ev.used < evaluations:
            before = ev.used
            if algorithm == "nsga2":
                # ask/tell, not pymoo's minimize: the budget counts distinct evaluations; each generation is saved
                nsga2_step(ev, algo, generation)
            elif algorithm == "linas":
                linas_step(ev, algo, population, lost=sn.importance_lost)
            else:
                lo, hi = encoder.bounds
                ev.evaluate(algo.rng.integers(lo, hi + 1, size=(population, encoder.n_var)), generation)
            generation += 1
            if ev.used == before and generation > 10 * evaluations:
                break  # nothing new is being proposed: the search space is exhausted
            algo_state = nsga2_state(algo) if algorithm == "nsga2" else algo.to_dict(algorithm)
            state.write(args=args, generation=generation, algorithm=algo_state, rows=[e.to_dict() for e in ev.order])
            bar.update(ev.used - before)
            best = min((e for e in ev.feasible()), key=lambda e: e.quality, default=None)
            if best:
                bar.set_postfix_str(f"gen {generation} best KL {best.quality:.3f} at {best.latency_ms:.1f} ms")
    selected, feasible = None, ev.feasible()
    if select and (obj.latency_budget is not None or obj.size_budget is not None) and feasible:
        selected = select_winner(sn, feasible, k=select, items=select_items, metric=select_metric,
                                 quant=obj.quality.quant, full_latency=obj.latency(full), out=out / "selection.json",
                                 baselines=baseline_rows(ev, sp), progress=progress)["chosen"]
    return write_outputs(out, ev, full_latency=obj.latency(full), full_size=obj.size(full),
                         vocab=int(sp.config["vocab_size"]), args=args, predictor=sp.predictor,
                         selected=None if selected is None else {**selected, "selected_by": METRICS[select_metric]})


def nsga2_step(ev: Evaluator, algo: Any, generation: int) -> None:
    """One NSGA-II generation: its offspring, or random immigrants where every offspring was a duplicate."""
    from pymoo.core.population import Population

    pop = algo.ask()
    if pop is None or len(pop) == 0:
        lo, hi = ev.encoder.bounds
        pop = Population.new("X", algo.random_state.integers(lo, hi + 1, size=(algo.pop_size, ev.encoder.n_var)))
    F, G = ev.evaluate(pop.get("X"), generation)
    pop.set("F", F, "G", G) if G.shape[1] else pop.set("F", F)
    algo.tell(infills=pop)


def baseline_rows(ev: Evaluator, sp: Setup) -> list[Evaluated]:
    """The networks `hwnas baseline` builds under the same budget, layer-drop's and width-uniform's, where they
    meet every budget: as the search evaluated them, else evaluated now (outside its budget, generation -1)."""
    obj, space = sp.objectives, sp.supernet.search_space
    if ev.obj.latency_budget is None:
        return []
    out: list[Evaluated] = []
    builds = (lambda: layer_drop(space, least_influential(sp.supernet.layer_importance), latency=obj.latency,
                                 budget=obj.latency_budget),
              lambda: width_uniform(space, sp.encoder.head_options, latency=obj.latency, budget=obj.latency_budget,
                                    quality=obj.quality)[0])
    for build in builds:
        try:
            cfg = build()
        except HwnasError:  # the method cannot reach the budget: nothing of its own to compare with
            continue
        e = ev.done.get(cfg) or Evaluated(cfg, float(ev.obj.quality(cfg)), float(ev.obj.latency(cfg)),
                                          float(ev.obj.size(cfg)), -1)
        if ev.obj.meets(e) and e not in out:
            out.append(e)
    return out


def _problem(encoder: GeneEncoder, n_constr: int) -> Any:
    from pymoo.core.problem import Problem

    lo, hi = encoder.bounds
    return Problem(n_var=encoder.n_var, n_obj=3, n_ieq_constr=n_constr, xl=lo, xu=hi, vtype=int)
