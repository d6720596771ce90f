"""Quality measurements of a causal LM: held-out perplexity and greedy generation.

The model may be a torch model or a deployed one (Optimum's ORT/OpenVINO models, see loading.load_artifact).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from .progress import tqdm


def pad_batch(rows: Sequence[Sequence[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded on the right to one width (causal attention never reads the padding): (ids, mask)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 8, max_len: int = 512,
               progress: bool = True) -> dict[str, float]:
    """Token-level perplexity over `texts`, each scored on its own (every token after the first), cut to `max_len`
    tokens and to the model's context (`max_position_embeddings`: a fused-attention ONNX graph refuses more)."""
    device = model.device
    max_len = min(max_len, getattr(getattr(model, "config", None), "max_position_embeddings", None) or max_len)
    nll, count = 0.0, 0
    batches = range(0, len(texts), batch_size)
    for start in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        enc = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_len] for t in texts[start:start + batch_size]]
        enc = [ids for ids in enc if len(ids) > 1]
        if not enc:
            continue
        ids, mask = (t.to(device) for t in pad_batch(enc))
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        target, valid = ids[:, 1:], mask[:, 1:].bool()
        loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        nll += loss[valid].sum().item()
        count += int(valid.sum())
    if count == 0:
        raise ValueError("no text to score: every passage was shorter than two tokens")
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count, "passages": len(texts)}


@torch.no_grad()
def greedy_generate(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 20, use_cache: bool = True) -> str:
    """Greedy continuation of `prompt` (the new text only)."""
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    enc = {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=use_cache,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def lambada_accuracy(model: Any, tokenizer: Any, items: Sequence[tuple[str, str]], *, progress: bool = True) -> dict[str, float]:
    """LAMBADA last-word accuracy: the continuation's tokens are each the greedy choice (lm-eval's `acc`)."""
    device = model.device
    hits = 0
    for ctx, cont in tqdm(items, desc="lambada", unit="item", disable=not progress):
        c = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        t = tokenizer(ctx + cont, add_special_tokens=False)["input_ids"][len(c):]
        if not t:
            continue
        ids = torch.tensor([c + t], device=device)
        pred = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, len(c) - 1:-1].argmax(-1)
        hits += int(pred.tolist() == t)
    n = len(items)
    acc = hits / n
    return {"acc": acc, "stderr": math.sqrt(acc * (1 - acc) / max(1, n - 1)), "n": n}
