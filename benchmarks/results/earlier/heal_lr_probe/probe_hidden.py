"""Probe: logit KD plus a hidden-state loss (student layer i's output against the teacher's output just before the
next kept layer), via forward hooks around hwnas.heal's loss; then LAMBADA validation perplexity."""
import json, sys, time
from pathlib import Path
import torch
import torch.nn.functional as F
import hwnas.heal as H
from hwnas.loading import load_model
from hwnas.metrics import perplexity
from hwnas.data import lambada_texts

name, tokens, subnet, weight = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
kept = json.loads((Path(subnet) / "hwnas_subnet.json").read_text())["layers"]
n_teacher = json.loads((Path(subnet) / "hwnas_subnet.json").read_text())["num_layers"]
targets = [kept[i + 1] - 1 for i in range(len(kept) - 1)] + [n_teacher - 1]
captured = {"s": {}, "t": {}}
orig_load = H.load_model
calls = []

def hook(kind, idx):
    def f(mod, inp, out):
        captured[kind][idx] = out[0] if isinstance(out, tuple) else out
    return f

def patched_load(path, **kw):
    m, tok = orig_load(path, **kw)
    kind = "s" if not calls else "t"
    calls.append(kind)
    for i, layer in enumerate(m.model.layers):
        if kind == "s" or i in targets:
            layer.register_forward_hook(hook(kind, i))
    return m, tok

orig_kd = H.kd_loss

def patched_kd(s_logits, t_logits, **kw):
    loss = orig_kd(s_logits, t_logits, **kw)
    hid = [1 - F.cosine_similarity(captured["s"][i].float(), captured["t"][t].float().detach(), dim=-1).mean()
           for i, t in enumerate(targets)]
    return loss + weight * torch.stack(hid).mean()

H.load_model, H.kd_loss = patched_load, patched_kd
out = Path("/tmp/probe") / name
t0 = time.time()
H.heal(model=subnet, teacher="smollm2-135m", tokens=tokens, out=out, overwrite=True, progress=False)
dt = time.time() - t0
model, tok = orig_load(out, allow_subnet=True)
p = perplexity(model, tok, lambada_texts("validation", 100), progress=False)
row = {"name": name, "tokens": tokens, "hidden_weight": weight, "ppl": p["perplexity"], "minutes": dt / 60}
print(json.dumps(row), flush=True)
with open("/tmp/probe/results.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
