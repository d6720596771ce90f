"""The search's quality objective: KL of a sub-network's next-token distribution from the full model's."""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from .defaults import CALIBRATION_SOURCE
from .space import SubnetConfig
from .supernet import Calibration, Supernet, calibration_batches


class KLQuality:
    """Mean KL(full || sub-network) of the next-token distributions on fixed calibration tokens.

    The full model is the fp32 teacher; with `quant` (an `OrtInt8`) sub-networks run as deployed in int8.
    `teacher`, the full model's log-probabilities per batch of `input_ids`, is computed here unless given
    (Ray workers receive it precomputed).
    """

    def __init__(self, supernet: Any, input_ids: Any, *, batch_size: int = 4, quant: Any = None,
                 teacher: Sequence[Any] | None = None) -> None:
        self.sn, self.ids, self.batch_size, self.quant = supernet, input_ids, batch_size, quant
        if teacher is None:
            supernet.set_max()
            with torch.no_grad():
                teacher = [torch.log_softmax(supernet(b).logits.float(), -1) for b in self.batches()]
        self.teacher = list(teacher)

    def batches(self) -> tuple[Any, ...]:
        return self.ids.split(self.batch_size)

    def emulating(self, quant: Any) -> "KLQuality":
        """This objective (same tokens and fp32 teacher), with sub-networks run under `quant`."""
        q = copy.copy(self)
        q.quant = quant
        return q

    def __call__(self, cfg: SubnetConfig) -> float:
        self.sn.set_active(cfg, quant=self.quant)
        total, n = 0.0, 0
        with torch.no_grad():
            for b, t in zip(self.batches(), self.teacher):
                s = torch.log_softmax(self.sn(b).logits.float(), -1)
                total += float((t.exp() * (t - s)).sum())
                n += b.numel()
        return total / n


def calibration_ids(tokenizer: Any, num_sequences: int, seq_len: int, source: str = CALIBRATION_SOURCE) -> Any:
    """Search-quality tokens: the importance order's calibration text (`source`: LAMBADA's calibration split and
    CoQA, or the books alone) taken from each source's end, so they are not the passages the importance order
    was computed on (taken from the start); never LAMBADA's test split."""
    return calibration_batches(tokenizer, Calibration(num_sequences, seq_len, source), from_end=True)


_CONTEXT: dict[tuple, tuple[Any, KLQuality]] = {}


def quality_context(model: str, sequences: int, seq_len: int,
                    source: str = CALIBRATION_SOURCE) -> tuple[Any, KLQuality]:
    """The supernet, its channels ordered on `source`'s calibration text, and its quality objective, built once
    per process (searches in a row share them)."""
    key = (str(model), sequences, seq_len, source)
    if key not in _CONTEXT:
        _CONTEXT.clear()  # one supernet in memory at a time
        sn = Supernet.from_pretrained(model, calibration=Calibration(source=source))
        _CONTEXT[key] = (sn, KLQuality(sn, calibration_ids(sn.tokenizer, sequences, seq_len, source)))
    return _CONTEXT[key]
