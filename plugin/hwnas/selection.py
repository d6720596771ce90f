"""Choosing the winner: the search's lowest-KL sub-network of each depth under the budget, and the networks that
`hwnas baseline` builds under it, re-scored on held-out task loss (`METRICS`): among sub-networks of nearly equal KL,
KL ranks depth against width badly. The lowest score wins; scores are saved per candidate, so a rerun resumes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .common import HwnasError, atomic_write_json, read_json
from .data import choice_questions, lambada_items, task_questions
from .metrics import pad_batch
from .space import SubnetConfig
from .elastic import ElasticLinear

ITEMS = 150  # held-out questions (passages for LAMBADA) per task that the selection scores by default
METRICS = {"choice-nll": "multiple-choice NLL of the right answer, SciQ/OpenBookQA/Social IQA validation (nats)",
           "lastword-nll": "LAMBADA last-word NLL, calibration split (nats/word)",
           "task-nll": "mean over ARC-Easy, PIQA, HellaSwag (answer NLL, last validation questions) and LAMBADA "
                       "(last-word NLL, calibration split) (nats)"}


def heldout_passages(n: int) -> list[tuple[str, str]]:
    """`n` (context, last word) pairs from the middle of LAMBADA's calibration split."""
    items = lambada_items("calibration")
    if not 1 <= n <= len(items) // 2:
        raise HwnasError(f"selection passages must be in 1..{len(items) // 2}, got {n}")
    start = len(items) // 2 - n // 2
    return items[start:start + n]


class Continuations:
    """Summed log-likelihood of each (context, continuation) pair under the supernet's active sub-network,
    batched by length; the LM head runs only where a continuation token is scored."""

    def __init__(self, supernet: Any, pairs: Sequence[tuple[str, str]], *, quant: Any = None, batch_size: int = 16,
                 max_tokens: int = 256) -> None:
        tok = supernet.tokenizer
        max_tokens = min(max_tokens, int(getattr(supernet.base_config, "max_position_embeddings", max_tokens)))
        self.sn, self.quant, self.batch_size = supernet, quant, batch_size
        self.pad = tok.eos_token_id if tok.eos_token_id is not None else 0
        self.seqs: list[list[int]] = []
        self.targets: list[int] = []  # how many tokens of each sequence's end are the continuation
        for ctx, cont in pairs:
            c = tok(ctx, add_special_tokens=False)["input_ids"]
            w = tok(cont, add_special_tokens=False)["input_ids"]
            self.seqs.append((c + w)[-max_tokens:])
            self.targets.append(min(len(w), len(self.seqs[-1]) - 1))

    def __call__(self, cfg: SubnetConfig) -> list[float]:
        import torch
        import torch.nn.functional as F

        self.sn.set_active(cfg, quant=self.quant)
        body, head = self.sn.model.model, self.sn.model.lm_head
        w, b = head.active_weight() if isinstance(head, ElasticLinear) else (head.weight, head.bias)
        if getattr(head, "quant", None) is not None:
            w = head.quant.weight(w)
        ll = torch.zeros(len(self.seqs), dtype=torch.float64)
        order = sorted(range(len(self.seqs)), key=lambda i: len(self.seqs[i]))
        with torch.no_grad():
            for k in range(0, len(order), self.batch_size):
                idx = order[k:k + self.batch_size]
                x, _ = pad_batch([self.seqs[i] for i in idx], self.pad)
                h = body(input_ids=x).last_hidden_state
                if getattr(head, "quant", None) is not None:  # the activation range of each whole sequence, as the full forward takes it
                    h = head.quant.activation(h)
                rows, pos, tgt, owner = [], [], [], []
                for r, i in enumerate(idx):
                    s, n = self.seqs[i], self.targets[i]
                    rows += [r] * n
                    pos += range(len(s) - n - 1, len(s) - 1)
                    tgt += s[-n:]
                    owner += [i] * n
                logp = torch.log_softmax(F.linear(h[rows, pos], w, b).float(), -1)
                ll.index_add_(0, torch.tensor(owner), logp[torch.arange(len(tgt)), torch.tensor(tgt)].double())
        return ll.tolist()


class Standalone:
    """A standalone checkpoint (a healed sub-network) behind the scorers' supernet interface: its one network is
    the one `SubnetConfig` it was exported as, scored in its own precision (no int8 emulation)."""

    def __init__(self, model: Any, tokenizer: Any, config: SubnetConfig) -> None:
        self.model, self.tokenizer, self.base_config, self.config = model, tokenizer, model.config, config

    def set_active(self, cfg: SubnetConfig, *, quant: Any = None) -> None:
        if cfg != self.config or quant is not None:
            raise HwnasError(f"a standalone checkpoint scores only its own network in its own precision, not {cfg}"
                             + (" under int8 emulation" if quant is not None else ""))


class LastWordNLL:
    """Mean NLL of each held-out LAMBADA passage's last word given its context (`lastword-nll`)."""

    def __init__(self, supernet: Any, passages: int = 128, **kw: Any) -> None:
        self.scorer = Continuations(supernet, heldout_passages(passages), **kw)

    def __call__(self, cfg: SubnetConfig) -> float:
        ll = self.scorer(cfg)
        return -sum(ll) / len(ll)


class ChoiceNLL:
    """Multiple-choice scores on held-out questions (`choice-nll`): calling gives the mean NLL of the right
    answer among the choices; `scores` adds lm-eval-style acc and acc_norm (by the choice's characters)."""

    def __init__(self, supernet: Any, questions: int = ITEMS, *, source: str = "unreported", **kw: Any) -> None:
        if source not in ("unreported", "reported"):
            raise HwnasError(f"question source must be 'unreported' or 'reported', got {source!r}")
        self.questions = (choice_questions if source == "unreported" else task_questions)(questions)
        self.owner = [(i, j) for i, (_, _, choices, _) in enumerate(self.questions) for j in range(len(choices))]
        self.scorer = Continuations(supernet, [(self.questions[i][1], " " + self.questions[i][2][j])
                                               for i, j in self.owner], **{"batch_size": 32, **kw})

    def scores(self, cfg: SubnetConfig) -> dict[str, float]:
        import numpy as np

        ll: dict[int, list[float]] = {}
        for (i, _), v in zip(self.owner, self.scorer(cfg)):
            ll.setdefault(i, []).append(v)
        nll, acc, acc_norm, per_task = [], [], [], {}
        for i, (task, _, choices, gold) in enumerate(self.questions):
            s = np.array(ll[i])
            nll.append(float(np.logaddexp.reduce(s) - s[gold]))
            per_task.setdefault(task, []).append(nll[-1])
            acc.append(float(np.argmax(s) == gold))
            acc_norm.append(float(np.argmax(s / np.array([len(c) for c in choices])) == gold))
        return {"choice_nll": float(np.mean(nll)), "choice_acc": float(np.mean(acc)),
                "choice_acc_norm": float(np.mean(acc_norm)),
                **{f"{t}_nll": float(np.mean(v)) for t, v in per_task.items()}}

    def __call__(self, cfg: SubnetConfig) -> float:
        return self.scores(cfg)["choice_nll"]


class TaskNLL:
    """`task-nll`: the mean over the reported tasks of each one's held-out NLL, `items` questions (passages for
    LAMBADA) each."""

    def __init__(self, supernet: Any, items: int = ITEMS, **kw: Any) -> None:
        self.choice = ChoiceNLL(supernet, items, source="reported", **kw)
        self.lambada = LastWordNLL(supernet, items, **kw)

    def scores(self, cfg: SubnetConfig) -> dict[str, float]:
        s = {k: v for k, v in self.choice.scores(cfg).items() if k in ("arc_easy_nll", "piqa_nll", "hellaswag_nll")}
        s["lambada_nll"] = self.lambada(cfg)
        return {"task_nll": sum(s.values()) / len(s), **s}

    def __call__(self, cfg: SubnetConfig) -> float:
        return self.scores(cfg)["task_nll"]


def scorer(metric: str, supernet: Any, items: int, *, quant: Any = None) -> LastWordNLL | ChoiceNLL | TaskNLL:
    """The selection score of `metric` over `items` held-out passages (lastword-nll) or questions per task."""
    check_metric(metric)
    return {"lastword-nll": LastWordNLL, "choice-nll": ChoiceNLL, "task-nll": TaskNLL}[metric](supernet, items,
                                                                                           quant=quant)


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise HwnasError(f"selection metric {metric!r} is not known; expected one of {list(METRICS)}")


def per_depth_best(rows: Sequence[Any], k: int) -> list[Any]:
    """The lowest-quality (KL) row of each depth, the `k` lowest of those, lowest first."""
    best: dict[int, Any] = {}
    for r in rows:
        d = r.config.depth
        if d not in best or r.quality < best[d].quality:
            best[d] = r
    return sorted(best.values(), key=lambda r: r.quality)[:k]


def candidates(rows: Sequence[Any], k: int, baselines: Sequence[Any] = ()) -> list[tuple[Any, str]]:
    """`per_depth_best(rows, k)`, then each row of `baselines` not among them, each with why it is a candidate."""
    out = [(r, "lowest KL of its depth") for r in per_depth_best(rows, k)]
    for r in baselines:
        if all(r.config != c.config for c, _ in out):
            out.append((r, "baseline's network"))
    return out


def select(supernet: Any, rows: Sequence[Any], *, k: int, items: int, quant: Any, full_latency: float, out: Path,
           metric: str = "choice-nll", baselines: Sequence[Any] = (), progress: bool = True) -> dict[str, Any]:
    """Score `candidates(rows, k, baselines)` by `metric` on `items` held-out items; write and return `out`
    (selection.json)."""
    import json

    from .progress import tqdm

    if k < 1:
        raise HwnasError(f"selection needs at least one candidate (k >= 1), got {k}")
    if not rows:
        raise HwnasError("the search found no sub-network within the budget to select from")
    settings = {"metric": METRICS[metric], "k": k, "items": items}
    saved = _read(out)
    scores = {c["key"]: c["nll"] for c in saved.get("candidates", [])} if saved.get("settings") == settings else {}
    score = scorer(metric, supernet, items, quant=quant)
    cands = []
    for r, why in tqdm(candidates(rows, k, baselines), desc=f"select ({metric})", unit="subnet",
                       disable=not progress):
        key = json.dumps(r.config.to_dict(), sort_keys=True, separators=(",", ":"))
        if key not in scores:
            scores[key] = score(r.config)
        cands.append({"key": key, "nll": scores[key], "kl": r.quality, "latency_ms": r.latency_ms,
                      "latency_ratio": r.latency_ms / full_latency, "size_bytes": int(r.size_bytes),
                      "layers": r.config.depth, "candidate": why, "config": r.config.to_dict()})
        atomic_write_json(out, {"settings": settings, "candidates": cands})
    chosen = min(cands, key=lambda c: c["nll"])
    result = {"settings": settings, "candidates": cands, "chosen": chosen}
    atomic_write_json(out, result)
    return result


def _read(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path, "saved selection scores")
    except HwnasError:
        return {}  # nothing saved, or not JSON: score again (nothing else depends on this file)
    return data if isinstance(data, dict) else {}
