"""hwnas: hardware-aware neural architecture search for LLaMA models.

    import hwnas
    sn = hwnas.Supernet.from_pretrained("smollm2-135m")
    cfg = sn.search_space.sample(seed=0)
    sn.set_active(cfg); logits = sn(input_ids).logits
    sn.extract(cfg).save_pretrained("out")
"""
from .common import HwnasError, point_library_caches

point_library_caches()  # before transformers is imported, so that its caches stay in the project

from .loading import DEFAULT_MODEL  # noqa: E402
from .space import SearchSpace, SubnetConfig  # noqa: E402

try:
    from .modeling import HwnasLlamaConfig, HwnasLlamaForCausalLM  # noqa: E402  (registers the Auto classes)
    from .supernet import Calibration, OrtInt8, Supernet  # noqa: E402
except ImportError as e:  # an edge device with only numpy and a runtime: `python -m hwnas.runner` still works
    if e.name not in ("torch", "transformers"):
        raise

__all__ = [
    "DEFAULT_MODEL",
    "Calibration",
    "HwnasError",
    "HwnasLlamaConfig",
    "HwnasLlamaForCausalLM",
    "OrtInt8",
    "SearchSpace",
    "SubnetConfig",
    "Supernet",
]
__version__ = "0.1.0"

