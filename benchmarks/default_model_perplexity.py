"""Perplexity of the embedded default model on held-out LAMBADA passages, against random weights.

Shows the default model is real: a trained model scores a few tens, random weights of the same
shape tens of thousands. Writes benchmarks/results/default_model_perplexity.{json,md}.

    .venv/bin/python benchmarks/default_model_perplexity.py [--limit 300]
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

import hwnas
from hwnas.common import atomic_write_json, atomic_write_text
from hwnas.data import lambada_texts
from hwnas.metrics import perplexity
from hwnas.loading import load_model

hwnas.point_library_caches()  # library caches stay inside the project


def main(limit: int | None, out_dir: Path) -> dict:
    model, tok = load_model("smollm2-135m")
    texts = lambada_texts("validation", limit)
    trained = perplexity(model, tok, texts)
    torch.manual_seed(0)
    random_model = type(model)(model.config).eval()
    random = perplexity(random_model, tok, texts)
    result = {
        "date": datetime.date.today().isoformat(),
        "command": f"python benchmarks/default_model_perplexity.py --limit {limit}",
        "data": f"LAMBADA validation split (see hwnas.data), first {len(texts)} passages",
        "tokens": trained["tokens"],
        "smollm2-135m": trained["perplexity"],
        "random_weights_same_shape": random["perplexity"],
    }
    atomic_write_json(out_dir / "default_model_perplexity.json", result)
    md = (
        f"| model | perplexity | scored tokens |\n|---|---|---|\n"
        f"| smollm2-135m (fp32) | {trained['perplexity']:.1f} | {trained['tokens']} |\n"
        f"| random weights, same shape | {random['perplexity']:.0f} | {random['tokens']} |\n"
    )
    atomic_write_text(out_dir / "default_model_perplexity.md", md)
    print(json.dumps(result, indent=2))
    print(md)
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None, help="first N passages of the split (default: all)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    a = p.parse_args()
    main(a.limit, a.out_dir)
