"""Multi-objective search over the supernet: quality loss against predicted latency and size.

The search knows three callables, as in Once-for-All: `quality(cfg)` (KL divergence of the
sub-network's next-token distribution from the full model's on held-out calibration text),
`latency(cfg)` (a `LatencyPredictor`) and `size(cfg)` (bytes at the target precision). Sub-networks
are integer gene vectors (`GeneEncoder`, one per search space). Budgets are pymoo constraints.

Algorithms, all held to the same number of real quality evaluations:
- `nsga2`: pymoo NSGA-II, every candidate evaluated for real;
- `linas`: LINAS (DyNAS-T): evaluate a population, fit a quality predictor on everything evaluated
  so far, run an inner NSGA-II on the predictor for thousands of cheap evaluations, evaluate that
  front for real, repeat;
- `random`: distinct random sub-networks, the baseline.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import numpy as np

from .common import HwnasError
from .selection import ITEMS as SELECT_ITEMS
from .space import SearchSpace, SubnetConfig

log = logging.getLogger(__name__)
ALGORITHMS = ("nsga2", "linas", "random")


@dataclasses.dataclass(frozen=True)
class GeneEncoder:
    """Sub-network <-> integer genes: per layer a keep bit, an MLP-width index and a head-option index,
    and with `mixed_precision` a fourth gene, 1 keeping the layer's down_proj fp32 (`SubnetConfig.fp32_down`).

    Genes of dropped layers are ignored when decoding. A gene vector keeping fewer layers than the
    space's minimum is repaired by keeping the lowest-index dropped layers.
    """

    space: SearchSpace
    mixed_precision: bool = False

    @property
    def genes_per_layer(self) -> int:
        return 4 if self.mixed_precision else 3

    @property
    def head_options(self) -> tuple[tuple[int, int], ...]:
        """(query heads, KV heads) pairs a layer may take, smallest first."""
        s = self.space
        return tuple(sorted({(kv * q, kv) for kv in s.kv_head_choices for q in s.q_per_kv_choices}))

    @property
    def n_var(self) -> int:
        return self.genes_per_layer * self.space.num_layers

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        L = self.space.num_layers
        upper = [1] * L + [len(self.space.mlp_choices) - 1] * L + [len(self.head_options) - 1] * L
        upper += [1] * L if self.mixed_precision else []
        return np.zeros(self.n_var, dtype=int), np.array(upper, dtype=int)

    def encode(self, cfg: SubnetConfig) -> np.ndarray:
        self.space.validate(cfg)
        if cfg.fp32_down and not self.mixed_precision:
            raise HwnasError("the sub-network keeps some down_proj fp32, but this search has no mixed precision "
                             "(its latency table offers none)")
        L, opts = self.space.num_layers, self.head_options
        keep, down = np.zeros(L, dtype=int), np.zeros(L, dtype=int)
        mlp = np.full(L, len(self.space.mlp_choices) - 1)
        head = np.full(L, len(opts) - 1)
        for layer, w, h, kv, fp32 in zip(cfg.layers, cfg.mlp, cfg.heads, cfg.kv_heads, cfg.fp32_down_mask):
            keep[layer], down[layer] = 1, fp32
            mlp[layer] = self.space.mlp_choices.index(w)
            head[layer] = opts.index((h, kv))
        return np.concatenate([keep, mlp, head] + ([down] if self.mixed_precision else []))

    def decode(self, x: Sequence[float]) -> SubnetConfig:
        L, opts = self.space.num_layers, self.head_options
        x = np.asarray(np.round(x), dtype=int)
        if x.shape != (self.n_var,):
            raise HwnasError(f"gene vector has shape {x.shape}; expected ({self.n_var},)")
        lo, hi = self.bounds
        x = np.clip(x, lo, hi)
        keep = [i for i in range(L) if x[i]]
        for i in range(L):  # repair: keep the lowest-index dropped layers up to the minimum depth
            if len(keep) >= self.space.min_layers:
                break
            if i not in keep:
                keep = sorted(keep + [i])
        mlp = tuple(self.space.mlp_choices[x[L + i]] for i in keep)
        heads = tuple(opts[x[2 * L + i]] for i in keep)
        down = tuple(int(x[3 * L + i]) for i in keep) if self.mixed_precision else ()
        return SubnetConfig(L, tuple(keep), mlp, tuple(h for h, _ in heads), tuple(kv for _, kv in heads), down)


class KLQuality:
    """Mean KL(full || sub-network) of the next-token distributions on fixed calibration tokens.

    The full model is the fp32 teacher; with `quant` (an `OrtInt8`) sub-networks run as deployed in int8.
    """

    def __init__(self, supernet: Any, input_ids: Any, *, batch_size: int = 4, quant: Any = None) -> None:
        import torch

        self.sn, self.ids, self.batch_size, self.quant = supernet, input_ids, batch_size, quant
        supernet.set_max()
        with torch.no_grad():
            self.teacher = [torch.log_softmax(supernet(b).logits.float(), -1) for b in self._batches()]

    def _batches(self):
        return self.ids.split(self.batch_size)

    def emulating(self, quant: Any) -> "KLQuality":
        """This objective (same tokens and fp32 teacher), with sub-networks run under `quant`."""
        import copy

        q = copy.copy(self)
        q.quant = quant
        return q

    def __call__(self, cfg: SubnetConfig) -> float:
        import torch

        self.sn.set_active(cfg, quant=self.quant)
        total, n = 0.0, 0
        with torch.no_grad():
            for b, t in zip(self._batches(), self.teacher):
                s = torch.log_softmax(self.sn(b).logits.float(), -1)
                total += float((t.exp() * (t - s)).sum())
                n += b.numel()
        return total / n


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
        raise HwnasError(f"size budget {obj.size_budget / 1e6:.1f} MB is below the smallest achievable, {size / 1e6:.1f} MB")


def pareto_mask(F: np.ndarray) -> np.ndarray:
    """True for the rows of F (minimised) that no other row dominates."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    mask = np.zeros(len(F), dtype=bool)
    if len(F):
        mask[NonDominatedSorting().do(F, only_non_dominated_front=True)] = True
    return mask


def hypervolume(F: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume of the points of F (minimised) dominating `ref`."""
    from pymoo.indicators.hv import HV

    F = F[np.all(F <= ref, axis=1)]
    return float(HV(ref_point=ref)(F)) if len(F) else 0.0


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
            e = Evaluated(c, float(q), float(self.obj.latency(c)), float(self.obj.size(c)), generation)
            self.done[c] = e
            self.order.append(e)
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

    def feasible(self) -> list[Evaluated]:
        return [e for e in self.order if self.obj.meets(e)]


def _problem(encoder: GeneEncoder, n_constr: int):
    from pymoo.core.problem import Problem

    lo, hi = encoder.bounds
    return Problem(n_var=encoder.n_var, n_obj=3, n_ieq_constr=n_constr, xl=lo, xu=hi, vtype=int)


def structured_seeds(encoder: GeneEncoder, obj: Objectives, layer_order: Sequence[int] | None) -> list[np.ndarray]:
    """What structured pruning would pick under the latency budget, one per depth.

    For k = 0, 1, ...: drop the k layers of lowest Block Influence (ShortGPT), then narrow every MLP to
    the widest uniform width that fits (Minitron-style width pruning), until dropping layers alone fits.
    Seeding the search with them means its front is never behind these baselines.
    """
    if obj.latency_budget is None or not layer_order:
        return []
    lo, hi = encoder.bounds
    L, seeds = encoder.space.num_layers, []
    full = encoder.encode(encoder.space.max_config())  # every down_proj int8 where precision is a gene
    for k in range(L - encoder.space.min_layers + 1):
        x = full.copy()
        x[list(layer_order[:k])] = 0
        for w in range(hi[L], lo[L] - 1, -1):
            x[L:2 * L] = w
            if obj.latency(encoder.decode(x)) <= obj.latency_budget:
                seeds.append(x.copy())
                break
        if seeds and seeds[-1][L] == hi[L]:
            break  # layer dropping alone fits: more dropped layers only lose quality
    return seeds


def initial_population(encoder: GeneEncoder, obj: Objectives, n: int, rng: np.random.Generator,
                       layer_order: Sequence[int] | None = None) -> np.ndarray:
    """Starting genes: structured-pruning seeds under the budget, then genes from the full model down to the smallest.

    Uniformly random genes drop half the layers, where every sub-network of a dense model is poor (KL
    above 5 on the default model), so a short search never reaches the region users want. Up to half
    the population are `structured_seeds`; each other individual shrinks every gene by its own random
    share of an intensity t (t = 0: the full model); with a budget, half of those take the t that puts
    their predicted latency at 90-100% of it (bisection on the predictor, no quality evaluation), the
    rest a uniform t, so the whole latency range stays covered.
    """
    seeds = structured_seeds(encoder, obj, layer_order)
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


def shrunk_genes(encoder: GeneEncoder, u: np.ndarray, t: float) -> np.ndarray:
    """Every gene moved from the full model's value towards the smallest by its share `u` of intensity `t`."""
    lo, hi = encoder.bounds
    return hi - np.round(t * u * (hi - lo)).astype(int)


def shrunk_to(encoder: GeneEncoder, latency: Callable[[SubnetConfig], float], u: np.ndarray,
              target: float) -> np.ndarray:
    """`shrunk_genes` with the smallest intensity whose predicted latency is at most `target` (bisection)."""
    a, b = 0.0, 1.0
    for _ in range(16):  # latency falls as t grows
        mid = (a + b) / 2
        a, b = (mid, b) if latency(encoder.decode(shrunk_genes(encoder, u, mid))) > target else (a, mid)
    return shrunk_genes(encoder, u, b)


def _nsga2(pop_size: int, seed: int, problem: Any, initial: np.ndarray | None = None):
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling
    from pymoo.core.termination import NoTermination

    algo = NSGA2(pop_size=pop_size, sampling=IntegerRandomSampling() if initial is None else initial,
                 crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
                 mutation=PM(eta=20, vtype=float, repair=RoundingRepair()), eliminate_duplicates=True)
    algo.setup(problem, termination=NoTermination(), seed=seed)
    return algo


def config_features(encoder: GeneEncoder, cfg: SubnetConfig, lost: np.ndarray | None = None) -> np.ndarray:
    """Per layer: kept, relative MLP width, relative head count and, with mixed precision, fp32 down_proj
    (0 for dropped layers). With `lost` (`Supernet.importance_lost(cfg)`), also its rows and their sums
    and sums of squares: what the sub-network cuts, in importance."""
    L, s, n = encoder.space.num_layers, encoder.space, encoder.genes_per_layer
    f = np.zeros((n, L))
    for layer, w, h, fp32 in zip(cfg.layers, cfg.mlp, cfg.heads, cfg.fp32_down_mask):
        f[:, layer] = (1.0, w / s.mlp_choices[-1], h / encoder.head_options[-1][0], float(fp32))[:n]
    if lost is None:
        return f.ravel()
    return np.concatenate([f.ravel(), lost.ravel(), lost.sum(1), (lost ** 2).sum(1)])


def fit_quality_predictor(X: np.ndarray, kl: np.ndarray, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """LINAS's quality predictor: the mean of a gradient-boosting and a ridge regressor of log KL.

    Each alone ranks held-out sub-networks worse than their mean (`benchmarks/search_efficiency.py
    --parts predictor` measures it against the gene-features-only gradient boosting used before).
    """
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.linear_model import RidgeCV

    y = np.log(np.asarray(kl, dtype=float) + 0.01)
    boost = GradientBoostingRegressor(n_estimators=200, max_depth=3, learning_rate=0.05, subsample=0.8,
                                      random_state=seed).fit(X, y)
    ridge = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(X, y)
    return lambda F: (boost.predict(F) + ridge.predict(F)) / 2


class LinasState:
    """What a LINAS run carries between iterations (pickled with the run's state)."""

    def __init__(self, seed: int, layer_order: Sequence[int] | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.iteration = 0
        self.layer_order = layer_order


def linas_step(ev: Evaluator, state: LinasState, pop_size: int, inner_generations: int = 50,
               inner_pop: int = 100, lost: Callable[[SubnetConfig], np.ndarray | None] | None = None) -> int:
    """One LINAS iteration: the first evaluates the initial population; later ones fit a quality predictor
    on everything evaluated, run NSGA-II on it, and evaluate up to `pop_size` new front members.

    The predictor (`fit_quality_predictor`) sees `config_features` with what each sub-network cuts in
    importance (`lost`, the supernet's `importance_lost`).
    """
    from pymoo.core.evaluator import Evaluator as PymooEvaluator
    from pymoo.core.problem import Problem

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
    algo = _nsga2(inner_pop, int(state.rng.integers(1 << 31)), inner)
    for _ in range(inner_generations):
        pop = algo.ask()
        PymooEvaluator().eval(inner, pop)
        algo.tell(infills=pop)
    front = algo.opt if algo.opt is not None and len(algo.opt) else algo.pop
    cands, seen = [], set()
    for x in front.get("X"):
        c = enc.decode(x)
        if c not in ev.done and c not in seen:
            seen.add(c)
            cands.append((obj.latency(c), x))
    # spread the picks along the predicted front, not its first members. Putting half of them where the
    # predicted KL is lowest instead found no better sub-network under the budget and lost 40% hypervolume
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
HV_REFERENCE = "(KL = ln(vocab), latency = full model's, size = full model's), on (KL, latency, size)"


def calibration_ids(tokenizer: Any, num_sequences: int, seq_len: int, source: str = "mixed") -> Any:
    """Search-quality tokens: the importance order's calibration text (`source`: LAMBADA's calibration split and
    CoQA, or the books alone) taken from each source's end, so they are not the passages the importance order
    was computed on (taken from the start); never LAMBADA's test split."""
    from .supernet import Calibration, calibration_batches

    return calibration_batches(tokenizer, Calibration(num_sequences, seq_len, source), from_end=True)


_CONTEXT: dict[tuple, tuple[Any, KLQuality]] = {}


def quality_context(model: str, sequences: int, seq_len: int, source: str = "mixed") -> tuple[Any, KLQuality]:
    """The supernet, its channels ordered on `source`'s calibration text, and its quality objective, built once
    per process (searches in a row share them)."""
    from .supernet import Calibration, Supernet

    key = (str(model), sequences, seq_len, source)
    if key not in _CONTEXT:
        _CONTEXT.clear()  # one supernet in memory at a time
        sn = Supernet.from_pretrained(model, calibration=Calibration(source=source))
        _CONTEXT[key] = (sn, KLQuality(sn, calibration_ids(sn.tokenizer, sequences, seq_len, source)))
    return _CONTEXT[key]


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
          seq_len: int = 128, calibration_source: str = "mixed") -> Setup:
    """The supernet, gene encoder and objectives of `model` against `table`, budgets checked.

    Against an onnxruntime int8 table the quality is measured under int8 emulation, with each layer's
    down_proj precision a gene (the table measures both). Weight-only int8 (int8-wo, OpenVINO int8) costs
    KL ~0.01, so against those tables the fp32 quality stands for the deployed one. `calibration_source`
    (data.CALIBRATION_SOURCES) is the text that orders the channels and that the KL is measured on.
    """
    from .loading import read_llama_config, resolve_model
    from .latency import model_signature
    from .predictor import LatencyPredictor

    config = read_llama_config(resolve_model(model))
    predictor = LatencyPredictor.load(table)
    predictor.table.check_model(model_signature(config))
    sn, quality = quality_context(model, sequences, seq_len, calibration_source)
    mixed = "down_proj" in predictor.table.mixed_precision
    if mixed:
        from .supernet import OrtInt8

        quality = quality.emulating(OrtInt8.from_settings(predictor.table.header["quantization"]))
    encoder = GeneEncoder(sn.search_space, mixed_precision=mixed)
    lat = lambda c: predictor.latency_ms(c, phase)  # noqa: E731
    size = lambda c: float(predictor.bytes(c))  # noqa: E731
    budget = latency_budget if latency_ratio is None else latency_ratio * lat(sn.search_space.max_config())
    obj = Objectives(quality, lat, size, budget, None if size_budget is None else size_budget * 1e6)
    check_budgets(encoder, obj)
    return Setup(sn, config, predictor, encoder, obj)


def run_search(*, model: str = "smollm2-135m", table: str, algorithm: str = "nsga2", evaluations: int = 200,
               population: int = 20, latency_budget: float | None = None, latency_ratio: float | None = None,
               size_budget: float | None = None, phase: str = "decode", seed: int = 0, workers: int = 1,
               ray_address: str | None = None, resume: bool = False, out: str, sequences: int = 8,
               seq_len: int = 128, select: int = 6, select_metric: str = "choice-nll",
               select_items: int = SELECT_ITEMS, calibration_source: str = "mixed",
               progress: bool = True) -> dict[str, Any]:
    """Search sub-networks of `model` trading KL to the full model against `table`'s predicted latency and size.

    Under a budget, the winner is then chosen by `hwnas.selection` among the `select` best depths and the
    layer-drop and width-uniform baselines' networks (`baseline_rows`), by
    `select_metric` on `select_items` held-out items (0: the lowest-KL feasible sub-network, as the front ranks them).
    """
    import pickle
    from pathlib import Path

    from tqdm import tqdm

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
    from .selection import METRICS, check_metric
    from .supernet import Calibration

    check_metric(select_metric)  # before the search, not after it
    out = Path(out)
    args = {"model": model, "table": str(Path(table).resolve()), "algorithm": algorithm, "evaluations": evaluations,
            "population": population, "latency_budget": latency_budget, "latency_ratio": latency_ratio,
            "size_budget": size_budget, "phase": phase, "seed": seed, "sequences": sequences, "seq_len": seq_len,
            "calibration": Calibration(source=calibration_source).key()}  # refuses an unknown source
    state_path = out / "state.pkl"
    if state_path.exists() and not resume:
        raise HwnasError(f"{out} holds a search; pass --resume to continue it or choose another --out")
    saved = None
    if resume and state_path.exists():
        with open(state_path, "rb") as f:
            saved = pickle.load(f)
        diff = {k: (saved["args"].get(k), v) for k, v in args.items() if saved["args"].get(k) != v}
        if diff:
            raise HwnasError("cannot resume: " + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items()))

    sp = setup(model=model, table=table, phase=phase, latency_budget=latency_budget, latency_ratio=latency_ratio,
               size_budget=size_budget, sequences=sequences, seq_len=seq_len, calibration_source=calibration_source)
    sn, config, predictor, encoder, obj = sp.supernet, sp.config, sp.predictor, sp.encoder, sp.objectives
    lat, size, full = obj.latency, obj.size, sn.search_space.max_config()
    ev = Evaluator(encoder, obj, evaluations, _ray_map(sn, obj.quality, workers, ray_address))
    problem = _problem(encoder, len(obj.constraints(0.0, 0.0)))
    if saved:
        for d in saved["evaluations"]:
            e = Evaluated(SubnetConfig.from_dict(d["config"]), d["quality"], d["latency_ms"], d["size_bytes"], d["generation"])
            ev.done[e.config] = e
            ev.order.append(e)
        algo, generation = saved["algo"], saved["generation"]
        if algorithm == "nsga2":
            algo.problem = problem
    else:
        generation = 0
        # least influential layers first (None before the importance calibration: random seeds only)
        layer_order = None if sn.layer_importance is None else [int(i) for i in np.argsort(sn.layer_importance)]
        if algorithm == "nsga2":
            algo = _nsga2(population, seed, problem,
                          initial_population(encoder, obj, population, np.random.default_rng(seed), layer_order))
        else:
            algo = LinasState(seed, layer_order if algorithm == "linas" else None)
    with tqdm(total=evaluations, initial=ev.used, desc=f"search {algorithm}", unit="eval", disable=not progress) as bar:
        while ev.used < evaluations:
            before = ev.used
            if algorithm == "nsga2":
                pop = algo.ask()
                if pop is None or len(pop) == 0:  # every offspring was a duplicate: bring in random immigrants
                    from pymoo.core.population import Population

                    lo, hi = encoder.bounds
                    pop = Population.new("X", algo.random_state.integers(lo, hi + 1, size=(population, encoder.n_var)))
                F, G = ev.evaluate(pop.get("X"), generation)
                pop.set("F", F, "G", G) if G.shape[1] else pop.set("F", F)
                algo.tell(infills=pop)
            elif algorithm == "linas":
                linas_step(ev, algo, population, lost=sn.importance_lost)
            else:
                lo, hi = encoder.bounds
                ev.evaluate(algo.rng.integers(lo, hi + 1, size=(population, encoder.n_var)), generation)
            generation += 1
            if ev.used == before and generation > 10 * evaluations:
                break  # nothing new is being proposed: the search space is exhausted
            _checkpoint(state_path, args, ev, algo, generation)
            bar.update(ev.used - before)
            best = min((e for e in ev.feasible()), key=lambda e: e.quality, default=None)
            if best:
                bar.set_postfix_str(f"gen {generation} best KL {best.quality:.3f} at {best.latency_ms:.1f} ms")
    selected, feasible = None, ev.feasible()
    if select and (obj.latency_budget is not None or obj.size_budget is not None) and feasible:
        from .selection import select as select_winner

        selected = select_winner(sn, feasible, k=select, items=select_items, metric=select_metric,
                                 quant=obj.quality.quant, full_latency=lat(full), out=out / "selection.json",
                                 baselines=baseline_rows(ev, sp), progress=progress)["chosen"]
    return write_outputs(out, ev, full_latency=lat(full), full_size=size(full), vocab=int(config["vocab_size"]),
                         args=args, predictor=predictor,
                         selected=None if selected is None else {**selected, "selected_by": METRICS[select_metric]})


def baseline_rows(ev: Evaluator, sp: Setup) -> list[Evaluated]:
    """The networks `hwnas baseline` builds under the same budget, layer-drop's and width-uniform's, where they
    meet every budget: as the search evaluated them, else evaluated now (outside its budget, generation -1)."""
    from .baselines import layer_drop, width_uniform

    if ev.obj.latency_budget is None:
        return []
    out: list[Evaluated] = []
    for build in (layer_drop, lambda s: width_uniform(s)[0]):
        try:
            cfg = build(sp)
        except HwnasError:  # the method cannot reach the budget: nothing of its own to compare with
            continue
        e = ev.done.get(cfg) or Evaluated(cfg, float(ev.obj.quality(cfg)), float(ev.obj.latency(cfg)),
                                          float(ev.obj.size(cfg)), -1)
        if ev.obj.meets(e) and e not in out:
            out.append(e)
    return out


def _checkpoint(path: Any, args: dict, ev: Evaluator, algo: Any, generation: int) -> None:
    import os
    import pickle
    import tempfile

    problem = getattr(algo, "problem", None)
    if problem is not None:
        algo.problem = None  # holds no state of its own; rebuilt on resume
    try:
        data = {"args": args, "generation": generation, "algo": algo,
                "evaluations": [_row(e) for e in ev.order]}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".state.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(data, f)
        os.replace(tmp, path)
    finally:
        if problem is not None:
            algo.problem = problem


def _row(e: Evaluated) -> dict[str, Any]:
    return {"config": e.config.to_dict(), "quality": e.quality, "latency_ms": e.latency_ms,
            "size_bytes": e.size_bytes, "generation": e.generation}


def _ray_map(sn: Any, quality: KLQuality, workers: int, address: str | None):
    """Serial evaluation for one worker; otherwise Ray actors sharing the supernet's weights."""
    if workers == 1 and address is None:
        return None
    from .parallel import RayQuality

    return RayQuality(sn, quality, workers=workers, address=address)


def write_outputs(out: Any, ev: Evaluator, *, full_latency: float, full_size: float, vocab: int,
                  args: dict[str, Any], predictor: Any, selected: dict[str, Any] | None = None) -> dict[str, Any]:
    """evaluations.csv, pareto.json, pareto.png and summary.json (with the front's hypervolume) in `out`.

    `selected` (a `hwnas.selection` candidate) is recorded in pareto.json as the winner; without it the
    winner is the front's lowest-KL member (the slowest member may not be: size counts too).
    """
    import csv
    import io
    import json
    import math

    from .common import atomic_write_json, atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["index", "generation", "kl", "latency_ms", "size_bytes", "feasible", "layers", "config"])
    feasible = {id(e) for e in ev.feasible()}
    for i, e in enumerate(ev.order):
        w.writerow([i, e.generation, repr(e.quality), repr(e.latency_ms), int(e.size_bytes),
                    int(id(e) in feasible), e.config.depth, json.dumps(e.config.to_dict(), separators=(",", ":"))])
    atomic_write_text(out / "evaluations.csv", buf.getvalue())
    cands = ev.feasible()
    F = np.array([e.objectives() for e in cands]).reshape(-1, 3)
    front = sorted((e for e, m in zip(cands, pareto_mask(F)) if m), key=lambda e: e.latency_ms)
    norm = np.array([1.0, 1.0 / full_latency, 1.0 / full_size])
    ref = np.array([math.log(vocab), 1.0, 1.0])
    hv = hypervolume(np.array([e.objectives() for e in front]).reshape(-1, 3) * norm, ref)
    pareto = [{"kl": e.quality, "latency_ms": e.latency_ms, "latency_ratio": e.latency_ms / full_latency,
               "size_bytes": int(e.size_bytes), "size_ratio": e.size_bytes / full_size, "layers": e.config.depth,
               "config": e.config.to_dict()} for e in front]
    best = min(pareto, key=lambda m: m["kl"], default=None)
    if selected is not None:
        best = {k: v for k, v in selected.items() if k != "key"}
    # the configs index channels in the importance order of this calibration: export rebuilds it
    atomic_write_json(out / "pareto.json", {"objectives": ["kl", "latency_ms", "size_bytes"], "phase": args["phase"],
                                            "table": args["table"], "calibration": args["calibration"], "front": pareto,
                                            **({"selected": best} if selected is not None else {})})
    summary = {"args": args, "evaluations": ev.used, "feasible": len(cands), "front_size": len(front),
               "hypervolume": hv, "hypervolume_reference": HV_REFERENCE, "normalised_by":
               {"kl": 1.0, "latency_ms": full_latency, "size_bytes": full_size},
               "full_model": {"kl": 0.0, "latency_ms": full_latency, "size_bytes": full_size},
               "latency_budget_ms": ev.obj.latency_budget, "size_budget_bytes": ev.obj.size_budget,
               "target": {"runtime": predictor.table.runtime, "precision": predictor.table.precision,
                          "device": predictor.table.device_id}}
    atomic_write_json(out / "summary.json", summary)
    pareto_plot(ev, front, full_latency, out / "pareto.png", budget=ev.obj.latency_budget)
    return {"out": str(out), "evaluations": ev.used, "front_size": len(front), "hypervolume": hv, "best": best}


def pareto_plot(ev: Evaluator, front: list[Evaluated], full_latency: float, path: Any, *, budget: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.scatter([e.latency_ms for e in ev.order], [e.quality for e in ev.order], s=10, c="0.7", label="evaluated")
    ax.plot([e.latency_ms for e in front], [e.quality for e in front], "o-", c="tab:red", ms=4, label="Pareto front")
    ax.scatter([full_latency], [0.0], marker="*", s=160, c="k", label="full model", zorder=5)
    if budget is not None:
        ax.axvline(budget, ls="--", c="tab:blue", lw=1, label="latency budget")
    ax.set(xlabel="predicted latency (ms)", ylabel="KL to the full model (nats/token)", title="hwnas search")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
