"""Choosing the winner: the search's best sub-network of each depth under the budget, re-scored on held-out task loss.

The search optimises KL to the full model: cheap and dense, but among sub-networks of nearly equal KL it
ranks depth against width badly (on the default model, a width-pruned front member at KL 1.69 scored
2.8 points below layer-drop at KL 1.72; see README, "Why"). So the last step looks past KL: it takes the
lowest-KL feasible sub-network of each depth, the `k` best of those, and scores them by the NLL of
LAMBADA's last word on calibration-split passages (never the test split; the middle of the split, which
neither the importance order nor the KL tokens read), run as the search ran them (int8 emulated where
it was). The winner is the lowest NLL. Scores are saved after each candidate, so a rerun resumes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .common import HwnasError, atomic_write_json, read_json
from .space import SubnetConfig

METRIC = "LAMBADA last-word NLL, calibration split (nats/word)"


def heldout_passages(n: int) -> list[tuple[str, str]]:
    """`n` (context, last word) pairs from the middle of LAMBADA's calibration split."""
    from .data import lambada_items

    items = lambada_items("calibration")
    if not 1 <= n <= len(items) // 2:
        raise HwnasError(f"selection passages must be in 1..{len(items) // 2}, got {n}")
    start = len(items) // 2 - n // 2
    return items[start:start + n]


class LastWordNLL:
    """Mean NLL of each passage's last word given its context, for the supernet's active sub-network."""

    def __init__(self, supernet: Any, passages: int = 128, *, quant: Any = None, batch_size: int = 16,
                 max_tokens: int = 256) -> None:
        tok = supernet.tokenizer
        max_tokens = min(max_tokens, int(getattr(supernet.base_config, "max_position_embeddings", max_tokens)))
        self.sn, self.quant, self.batch_size = supernet, quant, batch_size
        self.pad = tok.eos_token_id if tok.eos_token_id is not None else 0
        self.seqs: list[list[int]] = []
        self.targets: list[int] = []  # tokens of the last word, at the end of each sequence
        for ctx, word in heldout_passages(passages):
            c = tok(ctx, add_special_tokens=False)["input_ids"]
            w = tok(word, add_special_tokens=False)["input_ids"]
            self.seqs.append((c + w)[-max_tokens:])
            self.targets.append(len(w))

    def __call__(self, cfg: SubnetConfig) -> float:
        import torch

        from .evaluate import pad_batch

        self.sn.set_active(cfg, quant=self.quant)
        order = sorted(range(len(self.seqs)), key=lambda i: len(self.seqs[i]))
        total = 0.0
        with torch.no_grad():
            for k in range(0, len(order), self.batch_size):
                idx = order[k:k + self.batch_size]
                x, _ = pad_batch([self.seqs[i] for i in idx], self.pad)
                logp = torch.log_softmax(self.sn(x).logits.float(), -1)
                for r, i in enumerate(idx):
                    s, n = self.seqs[i], self.targets[i]
                    pos = torch.arange(len(s) - n - 1, len(s) - 1)
                    total -= float(logp[r, pos, torch.tensor(s[-n:])].sum())
        return total / len(self.seqs)


def per_depth_best(rows: Sequence[Any], k: int) -> list[Any]:
    """The lowest-quality (KL) row of each depth, the `k` lowest of those, lowest first."""
    best: dict[int, Any] = {}
    for r in rows:
        d = r.config.depth
        if d not in best or r.quality < best[d].quality:
            best[d] = r
    return sorted(best.values(), key=lambda r: r.quality)[:k]


def select(supernet: Any, rows: Sequence[Any], *, k: int, passages: int, quant: Any, full_latency: float,
           out: Path, progress: bool = True) -> dict[str, Any]:
    """Score `per_depth_best(rows, k)` by held-out last-word NLL; write and return `out` (selection.json)."""
    import json

    from tqdm import tqdm

    if k < 1:
        raise HwnasError(f"selection needs at least one candidate (k >= 1), got {k}")
    if not rows:
        raise HwnasError("the search found no sub-network within the budget to select from")
    settings = {"metric": METRIC, "k": k, "passages": passages}
    saved = _read(out)
    scores = {c["key"]: c["nll"] for c in saved.get("candidates", [])} if saved.get("settings") == settings else {}
    nll = LastWordNLL(supernet, passages, quant=quant)
    cands = []
    for r in tqdm(per_depth_best(rows, k), desc="select", unit="subnet", disable=not progress):
        key = json.dumps(r.config.to_dict(), sort_keys=True, separators=(",", ":"))
        if key not in scores:
            scores[key] = nll(r.config)
        cands.append({"key": key, "nll": scores[key], "kl": r.quality, "latency_ms": r.latency_ms,
                      "latency_ratio": r.latency_ms / full_latency, "size_bytes": int(r.size_bytes),
                      "layers": r.config.depth, "config": r.config.to_dict()})
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
