"""hwnas: hardware-aware neural architecture search for LLaMA models.

    import hwnas
    sn = hwnas.Supernet.from_pretrained("smollm2-135m")
    cfg = sn.search_space.sample(seed=0)
    sn.set_active(cfg); logits = sn(input_ids).logits
    sn.extract(cfg).save_pretrained("out")

Importing hwnas only registers the `hwnas_llama` model type with transformers' Auto classes; it changes no
environment. `hwnas.point_library_caches()` keeps later library caches (datasets, matplotlib, OpenVINO telemetry)
under the hwnas folder, as the `hwnas` command does first thing.
"""
from .common import HwnasError, point_library_caches
from .defaults import DEFAULT_MODEL
from .space import SearchSpace, SubnetConfig

try:
    from .modeling import HwnasLlamaConfig, HwnasLlamaForCausalLM  # registers the Auto classes
    from .elastic import OrtInt8
    from .supernet import Calibration, Supernet
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
    "point_library_caches",
]
__version__ = "0.1.0"

