"""LR/recipe probe: heal pick-subnet on N tokens with given settings, report LAMBADA validation ppl."""
import json, sys, time
from pathlib import Path
from hwnas.heal import heal
from hwnas.loading import load_model
from hwnas.metrics import perplexity
from hwnas.data import lambada_texts

name, tokens, subnet = sys.argv[1], int(sys.argv[2]), sys.argv[3]
settings = json.loads(sys.argv[4])
out = Path("/tmp/probe") / name
t = time.time()
rep = heal(model=subnet, teacher="smollm2-135m", tokens=tokens, out=out, overwrite=True, progress=False, **settings)
dt = time.time() - t
model, tok = load_model(out, allow_subnet=True)
p = perplexity(model, tok, lambada_texts("validation", 100), progress=False)
row = {"name": name, "tokens": tokens, "settings": settings, "ppl": p["perplexity"], "minutes": dt / 60}
print(json.dumps(row), flush=True)
with open("/tmp/probe/results.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
