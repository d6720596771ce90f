"""`hwnas heal`: distil a sub-network checkpoint from the model it was cut from.

The student learns the teacher's next-token distributions (forward KL on logits, `distill.kd_loss`) on text
that hwnas never calibrates, selects or evaluates on (`data.training_texts`). The healed checkpoint keeps the
input's format (plain `llama` or `hwnas_llama`, its config, tokenizer and hwnas files) and adds `hwnas_heal.json`
(corpus, tokens, tokens/s, settings), `heal_history.json` and `heal_curve.png`. Training checkpoints live
beside the output in `<out>.heal-checkpoint` until the run completes, so `--resume` continues a killed or
time-limited run. `snapshots` also writes the student, in the same format, at chosen token counts of the run.
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .common import HwnasError, atomic_dir, atomic_write_json, read_json
from .data import TrainingText, pack_tokens, training_texts
from .defaults import DEFAULT_MODEL
from .distill import (TrainConfig, bf16_native, broadcast_from_main, checkpoint_state, distributed_state, kd_loss,
                      kl_to_teacher, process_device, train)
from .loading import load_model, read_llama_config, require_kind, resolve_model

logger = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EVAL_SEQUENCES = 4  # held-out rows of the training text (after the trained ones) for the KL before and after
REPORT_FILE = "hwnas_heal.json"
_OWN_FILES = (REPORT_FILE, "heal_history.json", "heal_curve.png")


def checkpoint_dir(out: str | Path) -> Path:
    """Where a heal into `out` keeps its training checkpoints until it completes."""
    out = Path(out).resolve()
    return out.with_name(out.name + ".heal-checkpoint")


def snapshot_dir(out: str | Path, tokens: int) -> Path:
    """Where a heal into `out` writes its snapshot at `tokens` training tokens (`heal(snapshots=...)`)."""
    out = Path(out).resolve()
    return out.with_name(out.name + ".snapshots") / f"tokens-{tokens}"


def recorded_source(config: dict[str, Any]) -> str | None:
    """The model a sub-network checkpoint was cut from, as `hwnas export` records it (None for other models)."""
    sub = config.get("hwnas_subnet")
    return sub.get("source") if isinstance(sub, dict) else None


def check_pair(student_dir: Path, teacher_dir: Path, student_cfg: dict, teacher_cfg: dict,
               student_tok: Any, teacher_tok: Any) -> None:
    """Refuse a teacher that is not the student's source, or whose tokenizer differs."""
    source = recorded_source(student_cfg)
    if source is not None:
        try:
            same = resolve_model(source) == teacher_dir
        except HwnasError:  # the recorded source moved: its layer count and widths must still match
            sub = student_cfg["hwnas_subnet"]
            same = (sub.get("num_layers") == teacher_cfg.get("num_hidden_layers")
                    and Path(source).name == teacher_dir.name)
        if not same:
            raise HwnasError(f"{student_dir} was cut from {source}, not from the teacher {teacher_dir}; "
                             f"expected --teacher {source}")
    for key in ("vocab_size", "hidden_size"):
        if student_cfg.get(key) != teacher_cfg.get(key):
            raise HwnasError(f"the student {student_dir} has {key} {student_cfg.get(key)} and the teacher "
                             f"{teacher_dir} {teacher_cfg.get(key)}; expected the model the student was cut from")
    if student_tok is None or teacher_tok is None:
        missing = student_dir if student_tok is None else teacher_dir
        raise HwnasError(f"{missing} has no tokenizer; healing needs the student's and the teacher's")
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv or student_tok.eos_token_id != teacher_tok.eos_token_id:
        differ = len(set(sv.items()) ^ set(tv.items()))
        raise HwnasError(f"the student {student_dir} and the teacher {teacher_dir} have different tokenizers "
                         f"({len(sv)} and {len(tv)} tokens, {differ} entries differ; EOS {student_tok.eos_token_id} "
                         f"and {teacher_tok.eos_token_id}); expected the model the student was cut from")


def heal(
    *,
    model: str | Path,
    teacher: str | Path = DEFAULT_MODEL,
    tokens: int,
    out: str | Path,
    minutes: float | None = None,
    lora_rank: int = 0,
    resume: bool = False,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    lr: float | None = None,
    seq_len: int = 256,
    batch_size: int = 8,
    micro_batch: int = 4,
    train_text: str | Path | None = None,
    train_embeddings: bool = False,
    checkpoint_every: int = 25,
    bf16: bool | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    snapshots: Sequence[int] = (),
) -> dict[str, Any]:
    """Distil the sub-network checkpoint `model` from `teacher` on `tokens` training tokens into `out`.

    Full-parameter by default (the tied embedding and LM head frozen unless `train_embeddings`), or LoRA of
    rank `lora_rank` on every projection, merged before saving. `minutes` stops at that time limit with a
    checkpoint (the report says how many tokens were trained; `resume` continues). `lr` defaults to 6e-4 for
    full-parameter training and 1e-3 for LoRA. Each of `snapshots` (token counts below `tokens`, rounded down to
    whole batches) writes the student as trained so far to `snapshot_dir(out, count)`, in the output's format: one
    run's schedule, seen at several points (single process or data parallel; not under FSDP).
    """
    if minutes is not None and not minutes > 0:
        raise HwnasError(f"--minutes must be positive, got {minutes}")
    if lr is None:
        lr = 1e-3 if lora_rank else 6e-4
    cfg = TrainConfig(tokens=tokens, seq_len=seq_len, batch_size=batch_size, micro_batch=micro_batch, lr=lr,
                      temperature=temperature, hard_weight=hard_weight, seed=seed, checkpoint_every=checkpoint_every,
                      bf16=bf16, lora_rank=lora_rank)
    bad = [n for n in snapshots if not cfg.tokens_per_step <= n < tokens]
    if bad:
        raise HwnasError(f"snapshots {bad} are outside the run; expected token counts from one batch "
                         f"({cfg.tokens_per_step}) to below --tokens {tokens}")
    text = training_texts(train_text)
    student_dir, teacher_dir = resolve_model(model), resolve_model(teacher)
    for path in (student_dir, teacher_dir):
        require_kind(path, "torch", command="`hwnas heal`")
    out = Path(out).resolve()
    if out in (student_dir, teacher_dir):
        raise HwnasError(f"--out {out} is an input model; expected a new folder")
    extra = {"model": str(student_dir), "teacher": str(teacher_dir), "text": text.name,
             "text_fingerprint": text.fingerprint, "train_embeddings": train_embeddings}
    done = _finished(out, cfg, extra) if resume else None
    if done is not None:
        return done
    ckpt = _prepare_folders(out, resume=resume, overwrite=overwrite)
    student_cfg = read_llama_config(student_dir, allow_subnet=True)
    teacher_cfg = read_llama_config(teacher_dir)

    device = process_device()
    student, student_tok = load_model(student_dir, device=str(device), allow_subnet=True)
    teacher_model, teacher_tok = load_model(teacher_dir, device=str(device))
    check_pair(student_dir, teacher_dir, student_cfg, teacher_cfg, student_tok, teacher_tok)
    broadcast_from_main(student)
    broadcast_from_main(teacher_model)
    use_bf16 = bf16_native(device) if bf16 is None else bf16
    teacher_model.requires_grad_(False).eval()
    if use_bf16:  # the frozen teacher runs in bf16 whole: no per-step weight casts
        teacher_model.to(torch.bfloat16)

    rows = pack_tokens(student_tok, text.texts, seq_len, rows=cfg.steps * batch_size + EVAL_SEQUENCES)
    if len(rows) > cfg.steps * batch_size:
        train_rows, eval_rows = rows[:cfg.steps * batch_size], rows[cfg.steps * batch_size:]
    else:  # the text is smaller than the budget: epochs repeat it, and there is nothing left to hold out
        train_rows, eval_rows = rows, rows[:0]
    if len(train_rows) < cfg.steps * batch_size:
        logger.warning("the training text gives %d sequences of %d tokens; %d steps need %d, so it repeats",
                       len(train_rows), seq_len, cfg.steps, cfg.steps * batch_size)

    student, trainable = _trainable(student, lora_rank=lora_rank, train_embeddings=train_embeddings)
    kl_before = _held_out_kl(student, teacher_model, eval_rows, use_bf16)

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher_model(input_ids=batch, use_cache=False).logits
        logits = student(input_ids=batch, use_cache=False).logits
        labels = F.pad(batch[:, 1:], (0, 1), value=-100) if hard_weight else None
        return kd_loss(logits, target, temperature=temperature, labels=labels, hard_weight=hard_weight)

    snapshot_at = {n // cfg.tokens_per_step: n for n in snapshots}
    mode = f"lora-{lora_rank}" if lora_rank else "full"

    def on_step(history: list[dict[str, Any]]) -> None:
        asked = snapshot_at.get(history[-1]["step"])
        if asked is None or not distributed_state().is_main_process:
            return
        snap = copy.deepcopy(student)
        seconds = sum(cfg.tokens_per_step / h["tokens_per_s"] for h in history)
        report = {"model": str(student_dir), "teacher": str(teacher_dir), "out": str(snapshot_dir(out, asked)),
                  "snapshot_of": str(out), "model_type": student_cfg["model_type"], "mode": mode, "corpus": text.name,
                  "corpus_fingerprint": text.fingerprint, "tokens_requested": tokens, "tokens": history[-1]["tokens"],
                  "complete": False, "stopped": f"snapshot at {asked} tokens", "elapsed_s": seconds,
                  "tokens_per_s": history[-1]["tokens"] / seconds, "bf16": use_bf16, "config": cfg.to_dict(),
                  "final_loss": history[-1]["loss"], "train_embeddings": train_embeddings}
        _write_output(snap.merge_and_unload() if lora_rank else snap, student_dir, snapshot_dir(out, asked), report,
                      history)

    result = train(student, loss_fn, train_rows, cfg, out=ckpt, resume=resume, progress=progress,
                   params=trainable, extra=extra, minutes=minutes, on_step=on_step if snapshots else None)
    if lora_rank:
        student = student.merge_and_unload()
    kl_after = _held_out_kl(student, teacher_model, eval_rows, use_bf16)

    state = distributed_state()
    report = {"model": str(student_dir), "teacher": str(teacher_dir), "out": str(out),
              "model_type": student_cfg["model_type"], "mode": f"lora-{lora_rank}" if lora_rank else "full",
              "corpus": text.name, "corpus_fingerprint": text.fingerprint, "corpus_passages": len(text.texts),
              "tokens_requested": tokens, "tokens": result["tokens"], "complete": result["complete"],
              "stopped": result["stopped"], "tokens_per_s": result["tokens_per_s"], "elapsed_s": result["elapsed_s"],
              "processes": result["processes"], "bf16": result["bf16"],
              "trainable_parameters": sum(p.numel() for p in trainable),
              "held_out_kl": {"before": kl_before, "after": kl_after, "sequences": len(eval_rows)},
              "final_loss": result["history"][-1]["loss"] if result["history"] else None,
              "config": cfg.to_dict(), "train_embeddings": train_embeddings, "extra": extra}
    if state.is_main_process:
        _write_output(student, student_dir, out, report, result["history"])
        if result["complete"]:
            shutil.rmtree(ckpt, ignore_errors=True)
    state.wait_for_everyone()
    return report


def _finished(out: Path, cfg: TrainConfig, extra: dict[str, Any]) -> dict[str, Any] | None:
    """The report of a heal that already completed in `out` with these arguments (a resume has nothing to do)."""
    if checkpoint_state(checkpoint_dir(out)) is not None or not (out / REPORT_FILE).is_file():
        return None
    done = read_json(out / REPORT_FILE, "heal report")
    if not done.get("complete"):
        return None
    saved = done.get("extra", {})
    diffs = cfg.differences(done.get("config", {})) + [f"{k} was {saved.get(k)!r}, now {v!r}"
                                                       for k, v in extra.items() if saved.get(k) != v]
    if diffs:
        raise HwnasError(f"{out} holds a finished heal with other arguments: {'; '.join(diffs)}; pass --overwrite "
                         "to heal again")
    logger.info("%s is already healed with these arguments", out)
    return done


def _prepare_folders(out: Path, *, resume: bool, overwrite: bool) -> Path:
    """The checkpoint folder of `out`, after refusing to clobber what is there without --resume/--overwrite."""
    ckpt = checkpoint_dir(out)
    state = distributed_state()
    ours = (out / REPORT_FILE).is_file()
    if out.exists() and not out.is_dir():
        raise HwnasError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not (resume and ours):
        raise HwnasError(f"output folder {out} is not empty; pass --overwrite to replace it"
                         + (" or --resume to continue its heal" if ours else ""))
    if checkpoint_state(ckpt) is not None and not resume:
        if not overwrite:
            raise HwnasError(f"{ckpt} holds an unfinished heal; pass --resume to continue it or --overwrite to "
                             "start over")
        if state.is_main_process:
            shutil.rmtree(ckpt)
        state.wait_for_everyone()
    return ckpt


def _trainable(student: torch.nn.Module, *, lora_rank: int, train_embeddings: bool):
    """(model to train, its trainable parameters): LoRA adapters on every projection, or the whole network
    with the (tied) embedding and LM head frozen unless `train_embeddings`."""
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        student.requires_grad_(False)
        student = get_peft_model(student, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                     target_modules=LORA_TARGETS))
    else:
        student.requires_grad_(True)
        if not train_embeddings:
            student.get_input_embeddings().weight.requires_grad_(False)
            student.get_output_embeddings().weight.requires_grad_(False)
    return student, [p for p in student.parameters() if p.requires_grad]


def _held_out_kl(student: torch.nn.Module, teacher: torch.nn.Module, rows: torch.Tensor, use_bf16: bool) -> float | None:
    if len(rows) == 0:
        return None
    device = next(iter(student.parameters())).device
    was = student.training
    student.eval()
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            return kl_to_teacher(student, teacher, rows)
    finally:
        student.train(was)


def _write_output(student: torch.nn.Module, source: Path, out: Path, report: dict[str, Any],
                  history: list[dict[str, Any]]) -> None:
    """The healed checkpoint in the input's format: its files (config, tokenizer, hwnas records) copied, the
    weights replaced (in the input's dtype), and the heal's report, history and curve added."""
    raw = read_json(source / "config.json", "model config")
    dtype = getattr(torch, str(raw.get("torch_dtype") or raw.get("dtype") or "float32"), torch.float32)
    student = student.to(dtype)
    with atomic_dir(out, overwrite=True) as tmp:
        for f in source.iterdir():
            weights = f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json")
            if f.is_file() and not weights and f.name not in _OWN_FILES:
                shutil.copy2(f, tmp / f.name)
        student.save_pretrained(tmp, safe_serialization=True)
        for name in ("config.json", "generation_config.json"):  # the architecture is the input's, unchanged
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        export = tmp / "hwnas_export.json"
        if export.is_file():
            data = json.loads(export.read_text(encoding="utf-8"))
            data["heal"] = {k: report[k] for k in ("teacher", "corpus", "tokens", "tokens_per_s", "mode")}
            atomic_write_json(export, data)
        atomic_write_json(tmp / REPORT_FILE, report)
        atomic_write_json(tmp / "heal_history.json", history)
        if history:
            _plot_curve(history, tmp / "heal_curve.png", title=f"heal of {source.name} ({report['mode']})")


def _plot_curve(history: list[dict[str, Any]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([h["tokens"] for h in history], [h["loss"] for h in history], lw=1)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("KD loss (KL to the teacher, nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["heal", "check_pair", "checkpoint_dir", "snapshot_dir", "recorded_source", "TrainingText"]
