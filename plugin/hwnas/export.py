"""Export a sub-network as a standalone Hugging Face checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import atomic_dir, atomic_write_json
from .space import SubnetConfig


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def export_checkpoint(
    *,
    model: str = "smollm2-135m",
    subnet: str | Path,
    out: str | Path,
    overwrite: bool = False,
    supernet: Any = None,
) -> dict[str, Any]:
    """Write sub-network `subnet` (a config JSON) of `model` to `out`, with its tokenizer.

    The folder appears in one rename when complete. Returns a report of parameters and size
    against the full model, also saved as `out/hwnas_export.json`.
    """
    from .supernet import Supernet

    cfg = SubnetConfig.from_json(subnet)
    sn = supernet or Supernet.from_pretrained(model)
    sn.search_space.validate(cfg)
    sub = sn.extract(cfg)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        sub.save_pretrained(tmp, safe_serialization=True)
        if sn.tokenizer is not None:
            sn.tokenizer.save_pretrained(tmp)
        cfg.to_json(tmp / "hwnas_subnet.json")
        full_params = sn.num_parameters_of(sn.search_space.max_config())
        params = sum(p.numel() for p in sub.parameters())
        bytes_per = sub.dtype.itemsize
        report = {
            "model": str(model),
            "out": str(Path(out).resolve()),
            "model_type": sub.config.model_type,
            "uniform": cfg.is_uniform,
            "layers": cfg.depth,
            "full_layers": cfg.num_layers,
            "parameters": params,
            "full_parameters": full_params,
            "parameter_ratio": params / full_params,
            "weights_bytes": _dir_bytes(tmp),
            "full_weights_bytes": full_params * bytes_per,
        }
        report["size_ratio"] = report["weights_bytes"] / report["full_weights_bytes"]
        atomic_write_json(tmp / "hwnas_export.json", report)
    return report
