"""The healing engine: a KD loss on logits and a resumable, data-parallel training loop.

`train` runs any loss over packed token rows: `hwnas heal` distils one sub-network from its source model,
and `hwnas train-supernet` trains sub-networks with the sandwich rule inside its `loss_fn`. Batches are
chosen by step index and seed, and every step re-seeds the random generators, so a run resumed from a
checkpoint ends with the same weights as one that never stopped. Under `accelerate launch --multi_gpu` (or
torchrun) each process takes its share of every batch and the gradients are averaged over processes (data
parallel: NCCL on GPUs, gloo on CPUs). An FSDP launch on CPUs runs data parallel too (accelerate shards only
on GPUs); sharded (FSDP) training on GPUs is refused: its checkpoints would need gathering that is not built.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import HwnasError, atomic_write_json, read_json

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"  # the checkpoint's commit point: it names the weight and optimizer files
HISTORY_FILE = "train_history.json"
CHUNK_ELEMENTS = 1 << 24  # logits elements kd_loss holds in fp32 at once (64 MB)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run's result (a resume must repeat it exactly).

    `batch_size` counts sequences per optimizer step over all processes; `micro_batch` sequences go through
    one forward pass, and each process accumulates `batch_size / micro_batch / processes` of them.
    `bf16` None: autocast to bfloat16 where the device computes it natively (CPU: AMX or AVX512-BF16).
    """

    tokens: int
    seq_len: int = 256
    batch_size: int = 8
    micro_batch: int = 4
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5
    weight_decay: float = 0.0
    temperature: float = 1.0
    hard_weight: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 25
    bf16: bool | None = None
    lora_rank: int = 0

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "micro_batch", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise HwnasError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "lora_rank"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise HwnasError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if not isinstance(self.tokens, int) or self.tokens < self.tokens_per_step:
            raise HwnasError(f"--tokens {self.tokens} is below one batch: expected at least {self.tokens_per_step} "
                             f"({self.batch_size} sequences x {self.seq_len} tokens)")
        if self.micro_batch > self.batch_size:  # a forward pass never holds more than one batch
            object.__setattr__(self, "micro_batch", self.batch_size)
        if self.batch_size % self.micro_batch:
            raise HwnasError(f"micro_batch {self.micro_batch} does not divide batch_size {self.batch_size}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise HwnasError(f"expected lr > 0 and 0 <= min_lr_ratio <= 1, got lr {self.lr}, "
                             f"min_lr_ratio {self.min_lr_ratio}")
        if not self.temperature > 0 or self.hard_weight < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise HwnasError(f"expected temperature > 0 and hard_weight, weight_decay, grad_clip >= 0, got "
                             f"{self.temperature}, {self.hard_weight}, {self.weight_decay}, {self.grad_clip}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def steps(self) -> int:
        """Optimizer steps: whole batches within `tokens`."""
        return self.tokens // self.tokens_per_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def differences(self, saved: dict[str, Any]) -> list[str]:
        """Each field whose value differs from `saved` (a `to_dict()`), as "lr was 0.0001, now 0.0002"."""
        return [f"{k} was {saved.get(k)!r}, now {v!r}" for k, v in self.to_dict().items() if saved.get(k) != v]


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine down to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_rows(step: int, n_rows: int, batch_size: int, seed: int) -> torch.Tensor:
    """Row indices of step `step`'s batch: each epoch reads every row once, in an order drawn from (seed, epoch)."""
    first = step * batch_size
    out = []
    for pos in range(first, first + batch_size):
        epoch, at = divmod(pos, n_rows)
        out.append(_epoch_order(n_rows, seed, epoch)[at])
    return torch.stack(out)


@functools.lru_cache(maxsize=4)
def _epoch_order(n_rows: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def seed_step(seed: int, step: int) -> None:
    """Seed torch, numpy and `random` for one step, so a `loss_fn` that samples draws the same after a resume."""
    s = (seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


# ------------------------------------------------------------------------------ loss
class _KDLoss(torch.autograd.Function):
    """KL(teacher || student) at temperature T, plus `hard_weight` x next-token CE, computed chunk by chunk.

    Per token, KL = sum_j p_t,j (t_j - s_j) + logsumexp(s) - logsumexp(t) (logits divided by T), so no log-softmax
    is materialized. The gradient with respect to the student logits, softmax(s) - softmax(t), is formed in the
    same pass, so only a few chunks of fp32 values are alive at a time; backward scales the stored gradient.
    """

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                temperature: float, hard_weight: float, chunk: int) -> torch.Tensor:
        n = student.shape[0]
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(student) if want_grad else None
        kl = torch.zeros((), dtype=torch.float64, device=student.device)
        ce = torch.zeros((), dtype=torch.float64, device=student.device)
        n_labels = int((labels >= 0).sum()) if labels is not None and hard_weight else 0
        t = temperature
        with torch.autocast(device_type=student.device.type, enabled=False):
            for i in range(0, n, chunk):
                raw = student[i:i + chunk]
                s = raw.to(torch.float32, copy=True)
                tt = teacher[i:i + chunk].to(torch.float32, copy=True)
                if t != 1:
                    s.div_(t)
                    tt.div_(t)
                lse_s, lse_t = torch.logsumexp(s, -1, keepdim=True), torch.logsumexp(tt, -1, keepdim=True)
                pt = tt.sub(lse_t).exp_()
                per_token = tt.sub_(s).mul_(pt).sum(-1, keepdim=True)  # (a gemv would add up the row unpaired)
                kl += (per_token + lse_s - lse_t).sum(dtype=torch.float64)
                del tt
                if n_labels:
                    lab = labels[i:i + chunk]
                    valid = (lab >= 0)[:, None]
                    idx = lab.clamp(min=0)[:, None]
                    raw1 = s if t == 1 else raw.float()
                    lse1 = lse_s if t == 1 else torch.logsumexp(raw1, -1, keepdim=True)
                    ce -= ((raw1.gather(-1, idx) - lse1) * valid).sum(dtype=torch.float64)
                    if want_grad:  # d(CE mean)/ds = softmax(s) - one_hot(label), on labelled tokens
                        hard = raw1.sub(lse1).exp_().scatter_add_(-1, idx, -valid.float()).mul_(valid)
                        hard.mul_(hard_weight / n_labels)
                if want_grad:  # d(T^2 KL / n)/ds = T (softmax(s / T) - softmax(t / T)) / n
                    g = s.sub_(lse_s).exp_().sub_(pt)
                    if n_labels:
                        g.mul_(t / n).add_(hard)
                        grad[i:i + chunk] = g
                    else:  # the scale t / n is applied in backward, on the (narrower) stored gradient
                        grad[i:i + chunk] = g
        loss = kl * t * t / n + (hard_weight * ce / n_labels if n_labels else 0.0)
        ctx.scale = 1.0 if n_labels else t / n
        ctx.save_for_backward(*(() if grad is None else (grad,)))
        return loss.float()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        scale = grad_out.to(grad.dtype) * ctx.scale
        return grad.mul_(scale), None, None, None, None, None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
            labels: torch.Tensor | None = None, hard_weight: float = 0.0) -> torch.Tensor:
    """Mean per-token forward KL(teacher || student) of the softened distributions, scaled by T^2, plus
    `hard_weight` times the cross-entropy of `labels` (same leading shape as the logits, -100 ignored).

    Logits are (..., vocab) in any float dtype; fp32 is used chunk by chunk, and the student's gradient is kept
    in the student logits' dtype, so no full-batch fp32 copy of the logits is alive.
    """
    if student_logits.shape != teacher_logits.shape:
        raise HwnasError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape (do they share the vocabulary?)")
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.detach().reshape(-1, vocab)
    lab = labels.reshape(-1) if labels is not None else None
    if hard_weight and lab is None:
        raise HwnasError("hard_weight > 0 needs labels")
    if lab is not None and lab.shape[0] != s.shape[0]:
        raise HwnasError(f"labels {tuple(labels.shape)} do not match the logits {tuple(student_logits.shape[:-1])}")
    return _KDLoss.apply(s, t, lab, float(temperature), float(hard_weight), max(1, CHUNK_ELEMENTS // vocab))


# ------------------------------------------------------------------------------ devices
def distributed_state():
    """accelerate's process state (rank, world size, device). Without CUDA the processes that `accelerate launch
    --multi_gpu` or `torchrun` starts form a CPU group (gloo); accelerate alone would leave each one on its own."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def broadcast_from_main(module: nn.Module) -> None:
    """Copy the main process's weights to every other process. Under an FSDP launch, transformers loads real
    weights on the main process only (the others hold uninitialized memory until FSDP syncs what it wraps)."""
    state = distributed_state()
    if state.num_processes == 1:
        return
    import torch.distributed as dist

    seen: set[int] = set()
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            dist.broadcast(t.data, src=0)


def process_device() -> torch.device:
    """The device this process trains on (its GPU under `accelerate launch`, else cuda:0 or the CPU)."""
    device = distributed_state().device
    return torch.device("cpu") if device.type == "cpu" else device


def bf16_native(device: torch.device | str = "cpu") -> bool:
    """Whether `device` computes bfloat16 matmuls natively (CUDA with bf16, or a CPU with AMX or AVX512-BF16)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.backends.cpu.get_cpu_capability() == "AMX"
    return " amx_bf16" in flags or " avx512_bf16" in flags


# ------------------------------------------------------------------------------ checkpoints
def canonical_names(model: nn.Module) -> dict[int, str]:
    """A name per parameter that does not depend on which modules are active (the smallest of its aliases)."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in names or name < names[id(p)]:
            names[id(p)] = name
    return names


def _save_checkpoint(out: Path, step: int, named: list[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer,
                     state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    weights, optim = f"trainable-{step:07d}.safetensors", f"optimizer-{step:07d}.pt"
    tmp = out / f".{weights}.tmp"
    save_file({n: p.detach().to("cpu").contiguous() for n, p in named}, str(tmp))
    os.replace(tmp, out / weights)
    tmp = out / f".{optim}.tmp"
    torch.save(opt.state_dict(), tmp)
    os.replace(tmp, out / optim)
    atomic_write_json(out / STATE_FILE, {**state, "step": step, "weights": weights, "optimizer": optim})
    # older checkpoints, and the partial files of a save that a killed run left (`.trainable-*.tmp`)
    for f in [*out.glob("trainable-*.safetensors"), *out.glob("optimizer-*.pt"), *out.glob(".trainable-*.tmp"),
              *out.glob(".optimizer-*.tmp")]:
        if f.name not in (weights, optim):
            f.unlink(missing_ok=True)


def _load_checkpoint(out: Path, named: list[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer,
                     state: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(out / state["weights"]))
    missing = sorted({n for n, _ in named} - set(saved))
    if missing:
        raise HwnasError(f"checkpoint {out} lacks trainable weights {missing[:3]}; it was written for another model")
    with torch.no_grad():
        for name, p in named:
            if saved[name].shape != p.shape:
                raise HwnasError(f"checkpoint {out}: {name} is {tuple(saved[name].shape)}, the model's "
                                 f"{tuple(p.shape)}; it was written for another model")
            p.copy_(saved[name])
    opt.load_state_dict(torch.load(out / state["optimizer"], map_location="cpu", weights_only=True))


def checkpoint_state(out: str | Path) -> dict[str, Any] | None:
    """The state a checkpoint folder records (step, config, extra, history), or None when there is none."""
    path = Path(out) / STATE_FILE
    return read_json(path, "training checkpoint state") if path.is_file() else None


# ------------------------------------------------------------------------------ the loop
def train(model: nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor], batches: torch.Tensor,
          cfg: TrainConfig, *, out: Path, resume: bool = False, progress: bool = True,
          params: Iterable[nn.Parameter] | None = None, extra: dict[str, Any] | None = None,
          minutes: float | None = None,
          on_step: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """Train `params` (default: the trainable parameters of `model`) for `cfg.steps` AdamW steps.

    `loss_fn(batch)` returns the scalar loss of one micro-batch of token rows (it runs any teacher itself).
    `batches` is (rows, seq_len) token ids; step k reads rows `batch_rows(k, ...)`. A checkpoint goes to `out`
    every `cfg.checkpoint_every` steps, at the end, and when `minutes` have passed (then the run stops);
    `resume` continues from it and refuses a checkpoint written with another `cfg` or `extra`.
    `on_step(history)` runs on every process after each optimizer step, before that step's checkpoint (so a
    resumed run never skips a step's call).
    Returns (and writes to `out/train_history.json`) the per-step history and the totals.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    out = Path(out)
    extra = dict(extra or {})
    distributed_state()
    acc = Accelerator(cpu=not torch.cuda.is_available())
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    if batches.dim() != 2 or batches.shape[1] != cfg.seq_len or len(batches) == 0:
        raise HwnasError(f"training rows are {tuple(batches.shape)}; expected (rows, {cfg.seq_len})")
    if cfg.batch_size % (cfg.micro_batch * world):
        raise HwnasError(f"batch_size {cfg.batch_size} must be a multiple of micro_batch {cfg.micro_batch} x "
                         f"{world} processes")
    per_rank = cfg.batch_size // world
    accum = per_rank // cfg.micro_batch
    if acc.distributed_type == DistributedType.FSDP:
        raise HwnasError("sharded (FSDP) training is not supported; launch data parallel (accelerate launch "
                         "--multi_gpu) and train LoRA adapters (--lora-rank) where the full training state does not "
                         "fit one device")

    names = canonical_names(model)
    chosen = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    unknown = [p for p in chosen if id(p) not in names]
    if unknown:
        raise HwnasError(f"{len(unknown)} parameters to train are not parameters of the model")
    named = sorted({id(p): (names[id(p)], p) for p in chosen}.values(), key=lambda np_: np_[0])
    if not named:
        raise HwnasError("nothing to train: the model has no parameters that require gradients")
    device = next(iter(model.parameters())).device
    if device.type != acc.device.type and world > 1:
        model.to(acc.device)
        device = acc.device
    if world > 1:  # every process starts from the same weights
        broadcast_from_main(model)
    opt = torch.optim.AdamW([p for _, p in named], lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    use_bf16 = bf16_native(device) if cfg.bf16 is None else cfg.bf16

    state = checkpoint_state(out)
    history: list[dict[str, Any]] = []
    start, elapsed_before = 0, 0.0
    if state is not None and not resume:
        raise HwnasError(f"{out} holds a training checkpoint (step {state['step']}); pass --resume to continue it "
                         "or remove the folder")
    if state is not None:
        diffs = cfg.differences(state["config"]) + [
            f"{k} was {state.get('extra', {}).get(k)!r}, now {extra.get(k)!r}"
            for k in sorted(set(extra) | set(state.get("extra", {})))
            if state.get("extra", {}).get(k) != extra.get(k)]
        if diffs:
            raise HwnasError(f"cannot resume the checkpoint in {out} with other arguments: {'; '.join(diffs)}")
        _load_checkpoint(out, named, opt, state)
        start, history, elapsed_before = state["step"], list(state["history"]), float(state.get("elapsed_s", 0))
        logger.info("resuming %s at step %d of %d", out, start, cfg.steps)

    record = {"config": cfg.to_dict(), "extra": extra, "processes": world, "bf16": use_bf16}
    bar = _Progress(cfg.steps, start, enabled=progress and main)
    deadline = time.monotonic() + minutes * 60 if minutes is not None else None
    t_start, stopped = time.monotonic(), None
    was_training = model.training
    model.train()
    try:
        for step in range(start, cfg.steps):
            t0 = time.monotonic()
            seed_step(cfg.seed, step)
            rows = batch_rows(step, len(batches), cfg.batch_size, cfg.seed)[rank * per_rank:(rank + 1) * per_rank]
            lr = lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            total = torch.zeros((), dtype=torch.float64)
            for m in range(accum):
                mb = batches[rows[m * cfg.micro_batch:(m + 1) * cfg.micro_batch]].to(device)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = loss_fn(mb)
                (loss / accum).backward()
                total += loss.detach().double().cpu()
            if world > 1:
                _average_gradients([p for _, p in named], world)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            mean_loss = _all_reduce(float(total) / accum, world, device)
            if not math.isfinite(mean_loss):
                raise HwnasError(f"the loss became {mean_loss} at step {step + 1}; lower the learning rate "
                                 f"(lr {cfg.lr})")
            dt = time.monotonic() - t0
            history.append({"step": step + 1, "tokens": (step + 1) * cfg.tokens_per_step, "loss": mean_loss,
                            "lr": lr, "tokens_per_s": cfg.tokens_per_step / dt})
            bar.update(history[-1])
            if on_step is not None:
                on_step(history)
            done = step + 1 == cfg.steps
            late = deadline is not None and _all_reduce(float(time.monotonic() > deadline), world, device, "max") > 0
            if done or late or (step + 1) % cfg.checkpoint_every == 0:
                elapsed = elapsed_before + time.monotonic() - t_start
                if main:
                    _save_checkpoint(out, step + 1, named, opt, {**record, "history": history, "elapsed_s": elapsed})
                acc.wait_for_everyone()
            if late and not done:
                stopped = f"time limit of {minutes} min"
                break
    finally:
        bar.close()
        model.train(was_training)
    trained = history[-1]["step"] if history else start
    session_steps = trained - start
    session_s = time.monotonic() - t_start
    result = {**record, "steps": trained, "planned_steps": cfg.steps, "tokens": trained * cfg.tokens_per_step,
              "planned_tokens": cfg.steps * cfg.tokens_per_step, "complete": trained == cfg.steps,
              "stopped": stopped, "elapsed_s": elapsed_before + session_s,
              "tokens_per_s": (session_steps * cfg.tokens_per_step / session_s if session_steps else
                               trained * cfg.tokens_per_step / elapsed_before if elapsed_before else None),
              "history": history}
    if main:
        atomic_write_json(out / HISTORY_FILE, result)
    return result


def _average_gradients(params: list[nn.Parameter], world: int) -> None:
    """Average every gradient over the processes (what DDP does), checking they all computed the same ones."""
    import torch.distributed as dist

    have = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    agree = have.clone()
    dist.all_reduce(agree)
    if not torch.equal(agree, have * world):
        raise HwnasError("processes computed gradients for different parameters; a loss_fn must sample the "
                         "same sub-networks on every process (use the step's seeded random generators)")
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def _all_reduce(x: float, world: int, device: torch.device, op: str = "mean") -> float:
    """`x` averaged over the processes (`op` "mean"), or its largest value ("max": e.g. any process out of time)."""
    if world == 1:
        return x
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return float(t.item()) / (world if op == "mean" else 1)


class _Progress:
    """A tqdm bar with loss and tokens/s on a terminal; plain log lines to stderr otherwise."""

    def __init__(self, total: int, initial: int, *, enabled: bool) -> None:
        self.enabled, self.total = enabled, total
        self.every = max(1, total // 20)
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step")

    def update(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
            self.bar.update(1)
        elif row["step"] % self.every == 0 or row["step"] == self.total:
            print(f"train: step {row['step']}/{self.total}, {row['tokens']} tokens, loss {row['loss']:.4f}, "
                  f"lr {row['lr']:.2e}, {row['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def kl_to_teacher(student: nn.Module, teacher: nn.Module, batches: torch.Tensor, *, micro_batch: int = 4) -> float:
    """Mean per-token KL(teacher || student) at temperature 1 over token rows (no gradients)."""
    device = next(iter(student.parameters())).device
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(batches), micro_batch):
            mb = batches[i:i + micro_batch].to(device)
            s = student(input_ids=mb, use_cache=False).logits
            t = teacher(input_ids=mb, use_cache=False).logits
            total += float(kd_loss(s, t)) * mb.numel()
            n += mb.numel()
    return total / n

