"""`hwnas train-supernet`: one-shot supernet training (InstaTune) with the sandwich rule.

Every optimizer step trains the largest sub-network, the smallest and a few random ones, each distilled from
the frozen original model's logits (one teacher forward per micro-batch, shared by all of them); their losses,
and so their gradients, are summed, the largest sub-network's weighted by `largest_weight` (above 1 it holds the
full model nearer the original while the others train). The result is a supernet folder
(`Supernet.save_pretrained`: weights in importance order plus `SUPERNET_FILE`) that
`hwnas search/baseline/export/run --model DIR` take as a model.
"""
from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from .common import HwnasError
from .data import pack_tokens, training_texts
from .defaults import CALIBRATION_SOURCE, DEFAULT_MODEL
from .distill import TrainConfig, checkpoint_state, distributed_state, kd_loss, train
from .loading import load_model, resolve_model
from .space import SearchSpace, SubnetConfig
from .supernet import SUPERNET_FILE, Calibration, Supernet

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"  # inside the supernet folder: distill.train's weights, optimizer and state


def sandwich(space: SearchSpace, seed: int, random_subnets: int = 2) -> list[SubnetConfig]:
    """One step's sub-networks: the largest, the smallest and `random_subnets` drawn from `seed`."""
    rng = random.Random(seed)
    return [space.max_config(), space.min_config()] + [space.sample(rng.getrandbits(63)) for _ in range(random_subnets)]


class SandwichLoss:
    """`distill.train`'s loss: the summed KD losses of one step's sandwich sub-networks on a micro-batch.

    `distill.train` re-seeds torch at every step (`seed_step`), so `torch.initial_seed()` names the step: every
    micro-batch of a step, every process and a resumed run draw the same random sub-networks.
    """

    def __init__(self, supernet: Supernet, teacher: torch.nn.Module, *, random_subnets: int = 2,
                 temperature: float = 1.0, hard_weight: float = 0.0, largest_weight: float = 1.0) -> None:
        self.sn, self.teacher, self.largest_weight = supernet, teacher, largest_weight
        self.random_subnets, self.temperature, self.hard_weight = random_subnets, temperature, hard_weight
        self.steps: list[list[SubnetConfig]] = []  # the sub-networks of each step run so far
        self._step_seed: int | None = None

    def subnets(self) -> list[SubnetConfig]:
        seed = torch.initial_seed()
        if seed != self._step_seed:
            self._step_seed = seed
            self.steps.append(sandwich(self.sn.search_space, seed, self.random_subnets))
        return self.steps[-1]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        configs = self.subnets()
        with torch.no_grad():
            teacher = self.teacher(input_ids=batch, use_cache=False).logits
        labels = None
        if self.hard_weight:
            labels = torch.full_like(batch, -100)
            labels[:, :-1] = batch[:, 1:]
        total = torch.zeros((), device=batch.device)
        try:
            for i, cfg in enumerate(configs):
                self.sn.set_active(cfg)
                logits = self.sn(batch, use_cache=False).logits
                weight = self.largest_weight if i == 0 else 1.0  # sandwich() puts the largest first
                total = total + weight * kd_loss(logits, teacher, temperature=self.temperature, labels=labels,
                                                 hard_weight=self.hard_weight)
        finally:
            self.sn.set_max()
        return total


def train_supernet(*, model: str = DEFAULT_MODEL, tokens: int, out: str | Path, resume: bool = False,
                   mlp_step: int = 64, calibration_source: str = CALIBRATION_SOURCE, lr: float = 1e-4,
                   seq_len: int = 256, batch_size: int = 8, micro_batch: int = 4, random_subnets: int = 2,
                   temperature: float = 1.0, largest_weight: float = 1.0, train_text: str | Path | None = None,
                   seed: int = 0, checkpoint_every: int = 25, minutes: float | None = None, bf16: bool | None = None,
                   overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train `model`'s supernet (channels in the `calibration_source` importance order) on `tokens` training tokens
    with the sandwich rule, distilled from the frozen `model`, and write it as a supernet folder `out`.

    A checkpoint goes to `out/checkpoint` every `checkpoint_every` steps; `resume` continues it (refusing other
    arguments) to the same final weights. `minutes` stops early at a checkpoint: the folder then holds the
    weights so far (`complete` false) and `resume` goes on. Works under `accelerate launch` (data parallel).
    """
    path = resolve_model(model)
    if (path / SUPERNET_FILE).is_file():
        raise HwnasError(f"{path} is already a trained supernet; continue its training with --resume and its own "
                         "--out, or train from the model it was made from")
    if random_subnets < 0:
        raise HwnasError(f"--random-subnets must be 0 or more, got {random_subnets}")
    if minutes is not None and not minutes > 0:
        raise HwnasError(f"--minutes must be positive, got {minutes}")
    if not largest_weight > 0:
        raise HwnasError(f"--largest-weight must be positive, got {largest_weight}")
    cfg = TrainConfig(tokens=tokens, seq_len=seq_len, batch_size=batch_size, micro_batch=micro_batch, lr=lr,
                      temperature=temperature, seed=seed, checkpoint_every=checkpoint_every, bf16=bf16)
    calibration = Calibration(source=calibration_source)
    text = training_texts(train_text)
    source = str(model) if str(model) == DEFAULT_MODEL else str(path)
    extra = {"kind": "supernet", "model": source, "mlp_step": mlp_step, "calibration": calibration.key(),
             "random_subnets": random_subnets, "largest_weight": largest_weight, "train_text": text.name,
             "train_text_fingerprint": text.fingerprint}
    out = Path(out).resolve()
    ckpt = out / CHECKPOINT_DIR
    if out.is_file():
        raise HwnasError(f"--out {out} is a file; expected a folder for the supernet")
    busy = out.is_dir() and any(out.iterdir())
    if busy and not resume and not overwrite:
        what = "a training checkpoint" if checkpoint_state(ckpt) else "files"
        raise HwnasError(f"{out} holds {what}; pass --resume to continue that training, --overwrite to replace it, "
                         "or choose another --out")
    state = distributed_state()  # the process group distill.train trains in
    with state.main_process_first():  # the main process clears the folder and computes the importance order first
        if busy and overwrite and not resume and state.is_main_process:
            shutil.rmtree(out)
        sn = Supernet.from_pretrained(source, calibration=calibration, mlp_step=mlp_step)
    if sn.tokenizer is None:
        raise HwnasError(f"{path} has no tokenizer; training needs one")
    teacher, _ = load_model(path)
    teacher.requires_grad_(False)
    ids = pack_tokens(sn.tokenizer, text.texts, seq_len, rows=cfg.steps * cfg.batch_size)
    loss = SandwichLoss(sn, teacher, random_subnets=random_subnets, temperature=temperature,
                        largest_weight=largest_weight)
    result = train(sn, loss, ids, cfg, out=ckpt, resume=resume, progress=progress, extra=extra, minutes=minutes)
    summary = {"source": source, "tokens": result["tokens"], "planned_tokens": result["planned_tokens"],
               "steps": result["steps"], "complete": result["complete"], "train_text": text.name,
               "train_text_rows": len(ids), "sandwich": ["largest", "smallest"] + ["random"] * random_subnets,
               "largest_weight": largest_weight,
               "config": cfg.to_dict(), "processes": result["processes"], "bf16": result["bf16"],
               "elapsed_s": result["elapsed_s"], "tokens_per_s": result["tokens_per_s"], "stopped": result["stopped"]}
    if state.is_main_process:
        sn.set_max()
        sn.save_pretrained(out, tokens=result["tokens"], training=summary)
    state.wait_for_everyone()
    return {"out": str(out), "calibration": calibration.key(), "search_space_size": sn.search_space.size(), **summary}
