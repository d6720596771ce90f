"""Quality evaluations spread over Ray workers that share one read-only copy of the supernet.

The supernet's weights (importance-ordered), the calibration tokens and the full model's
log-probabilities go into Ray's object store once, as numpy arrays. Each worker maps them without
copying (numpy arrays from the object store are read-only views of shared memory), builds the
supernet around them, and evaluates the sub-networks it is sent. `ray.init` starts a local cluster
of `workers` CPUs by itself, or joins `address` (`ray start --head` elsewhere, many GPUs).
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from .common import HwnasError, home
from .quality import KLQuality
from .space import SubnetConfig
from .supernet import Supernet


_MAX_RAY_TMP = 40  # longest session parent folder whose sockets stay under AF_UNIX's 107 bytes


def _init_ray(workers: int, address: str | None) -> Any:
    try:
        import ray
    except ImportError:
        raise HwnasError("--workers/--ray-address need Ray: pip install 'ray==2.60.0'") from None
    if not ray.is_initialized():
        # Ray writes a session folder and an auth token; keep both inside the hwnas folder, unless its path
        # is too long for the session's Unix sockets (107 bytes, ~62 of them Ray's): then the system temp dir.
        tmp = home() / "ray"
        tmp.mkdir(parents=True, exist_ok=True)
        sessions = tmp if len(str(tmp)) <= _MAX_RAY_TMP else Path(tempfile.gettempdir()) / f"hwnas-ray-{os.getuid()}"
        sessions.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("RAY_TMPDIR", str(sessions))
        if not address and not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            token = tmp / "auth_token"  # a local cluster's token; Ray's default is ~/.ray/auth_token
            if not token.exists():
                import secrets

                token.touch(mode=0o600)
                token.write_text(secrets.token_hex(32))
            os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=workers, _temp_dir=str(sessions), **kwargs)
    return ray


class RayQuality:
    """`quality(cfgs) -> [KL]` evaluated by `workers` Ray actors; order of results = order of configs."""

    def __init__(self, supernet: Any, quality: KLQuality, *, workers: int, address: str | None = None) -> None:
        ray = _init_ray(workers, address)
        supernet.set_max()
        weights = {k: v.detach().cpu().numpy() for k, v in supernet.model.state_dict().items()}
        shared = ray.put({"weights": weights, "config": supernet.model.config.to_dict(),
                          "mlp_step": supernet.search_space.mlp_choices[0],
                          "ids": quality.ids.numpy(), "teacher": [t.numpy() for t in quality.teacher],
                          "batch_size": quality.batch_size, "quant": quality.quant})
        threads = max(1, (os.cpu_count() or 1) // workers)
        worker = ray.remote(num_cpus=1)(_Worker)
        self.ray, self.actors = ray, [worker.remote(shared, threads) for _ in range(workers)]

    def __call__(self, cfgs: list[SubnetConfig]) -> list[float]:
        futures = [self.actors[i % len(self.actors)].quality.remote(c.to_dict()) for i, c in enumerate(cfgs)]
        return [float(q) for q in self.ray.get(futures)]


class _Worker:
    def __init__(self, shared: dict[str, Any], threads: int) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        torch.set_num_threads(threads)
        config = LlamaConfig(**{k: v for k, v in shared["config"].items() if k != "model_type"})
        with warnings.catch_warnings():  # the shared arrays are read-only, and nothing here writes to them
            warnings.simplefilter("ignore", UserWarning)
            tensors = {k: torch.from_numpy(v) for k, v in shared["weights"].items()}
            with torch.device("meta"):
                model = LlamaForCausalLM(config)
            model.load_state_dict(tensors, strict=False, assign=True)
            model.tie_weights()
        model.model.rotary_emb = LlamaRotaryEmbedding(config)  # a computed buffer, not in the state dict
        leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        assert not leftover, leftover
        model.eval()
        self.sn = Supernet(model, None, mlp_step=shared["mlp_step"])
        # the full model's log-probabilities come precomputed; `quant` is the int8 emulation, when the search weighs it
        self.q = KLQuality(self.sn, torch.from_numpy(shared["ids"]), batch_size=shared["batch_size"],
                           quant=shared["quant"], teacher=[torch.from_numpy(t) for t in shared["teacher"]])

    def quality(self, cfg: dict[str, Any]) -> float:
        return self.q(SubnetConfig.from_dict(cfg))
