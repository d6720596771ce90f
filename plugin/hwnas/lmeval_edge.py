"""lm-eval on the edge runtimes: a GGUF model in llama.cpp and an ONNX Runtime GenAI model, scored as deployed.

Each runtime tokenizes with its own tokenizer (the one a user's app runs; `hwnas.export` writes one that both read
as Hugging Face does) and scores a request by running context + continuation once and reading the log-softmax of
every continuation token, as lm-eval's HFLM does for a torch model: no special tokens are added, and a request
longer than the context window keeps its last tokens. llama.cpp keeps the KV cache of the prefix that consecutive
requests share (the choices of one question), so it computes only the new tokens.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .common import HwnasError
from .genai import genai_config, open_model, require_genai
from .llamacpp import check_gguf, open_gguf, token_nll

EDGE_RUNTIMES = ("llamacpp", "ortgenai")
MAX_LENGTH = 2048  # HFLM's default window


class GgufScorer:
    """A GGUF file in llama.cpp: its tokenizer, and the logits of every position of a token list."""

    runtime = "llamacpp"

    def __init__(self, path: str | Path, threads: int, max_length: int = MAX_LENGTH) -> None:
        from gguf import GGUFReader

        self.path = check_gguf(path)
        fields = GGUFReader(str(self.path)).fields  # the trained context, read without loading the model
        arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
        trained = fields.get(f"{arch}.context_length")
        self.max_length = min(max_length, int(trained.contents()) if trained is not None else max_length)
        self.llm = open_gguf(self.path, threads=threads, ctx=self.max_length, logits_all=True)
        self.eot = int(self.llm.token_eos())
        self.done: list[int] = []  # the tokens whose KV cache and logits the context holds

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def logits(self, ids: list[int]) -> np.ndarray:
        shared = 0
        while shared < min(len(ids) - 1, len(self.done)) and ids[shared] == self.done[shared]:
            shared += 1  # the last token is always run again: its logits must be this call's
        self.llm.n_tokens = shared  # eval drops the cached positions from here on
        self.llm.eval(ids[shared:])
        self.done = list(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def close(self) -> None:
        self.llm.close()


class GenAIScorer:
    """An ONNX Runtime GenAI folder: its tokenizer, and the logits of every position of a token list."""

    runtime = "ortgenai"

    def __init__(self, folder: str | Path, threads: int, max_length: int = MAX_LENGTH) -> None:
        self.og, self.path = require_genai(), Path(folder)
        config = genai_config(self.path)["model"]
        self.model = open_model(self.path, threads)
        self.tokenizer = self.og.Tokenizer(self.model)
        self.max_length = min(max_length, int(config.get("context_length") or max_length))
        eos = config.get("eos_token_id")
        self.eot = int(eos[0] if isinstance(eos, list) else eos)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def logits(self, ids: list[int]) -> np.ndarray:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids), do_sample=False)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(np.array([ids], dtype=np.int32))
        return np.asarray(gen.get_output("logits"), dtype=np.float32)[0]

    def close(self) -> None:
        del self.model


def open_scorer(path: str | Path, runtime: str, threads: int = 2) -> GgufScorer | GenAIScorer:
    """The scorer of a GGUF file (llamacpp) or a GenAI folder (ortgenai)."""
    from .benchmark import locate

    found, target = locate(path, runtime)
    return GgufScorer(target, threads) if found == "llamacpp" else GenAIScorer(target, threads)


def edge_lm(scorer: GgufScorer | GenAIScorer, progress: bool) -> Any:
    """An lm-eval LM (TemplateLM) that scores loglikelihood requests with `scorer`."""
    from lm_eval.api.model import TemplateLM

    from .progress import tqdm

    class EdgeLM(TemplateLM):
        @property
        def eot_token_id(self) -> int:
            return scorer.eot

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            return scorer.encode(string)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any):
            out = []
            for _, context, continuation in tqdm(requests, desc=f"lm-eval ({scorer.runtime})",
                                                 disable=disable_tqdm or not progress):
                if not continuation:
                    raise HwnasError(f"lm-eval asked for an empty continuation after {len(context)} context tokens")
                ids = (context + continuation)[-(scorer.max_length + 1):][:-1]
                logits, target = scorer.logits(ids)[-len(continuation):], np.array(continuation)
                out.append((-float(token_nll(logits, target).sum()), bool((logits.argmax(axis=1) == target).all())))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise HwnasError("rolling loglikelihood (perplexity tasks) is not implemented for llama.cpp and GenAI "
                             "models; hwnas's tasks score loglikelihood only")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise HwnasError("generation tasks are not implemented for llama.cpp and GenAI models; hwnas's tasks "
                             "score loglikelihood only")

        def get_model_info(self) -> dict:
            return {"runtime": scorer.runtime, "model": str(scorer.path)}

    return EdgeLM()

