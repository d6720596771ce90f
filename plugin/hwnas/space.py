"""The search space: `SubnetConfig` (one sub-network) and `SearchSpace` (what a supernet allows)."""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .common import HwnasError, atomic_write_json, read_json

_PER_LAYER = ("mlp", "heads", "kv_heads")
# far past any Llama: they bound the memory and time a model config can make the space take
_LIMITS = {"num_layers": 1 << 12, "intermediate_size": 1 << 24, "num_heads": 1 << 12, "num_kv_heads": 1 << 12}
_MAX_MLP_CHOICES = 1 << 16


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise HwnasError(f"SubnetConfig.{name} must be a list of integers, got {value!r}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int):
            raise HwnasError(f"SubnetConfig.{name}[{i}] must be an integer, got {v!r}")
        out.append(int(v))
    return tuple(out)


@dataclass(frozen=True)
class SubnetConfig:
    """One sub-network of a supernet with `num_layers` decoder layers.

    `layers` lists the kept source layers (increasing). `mlp`, `heads` and `kv_heads` have one
    entry per kept layer: the MLP intermediate width, the number of query heads and the number
    of key/value heads (query heads are split evenly over the KV groups).

    `fp32_down` is a deployment choice for onnxruntime's dynamic int8: one 0/1 per kept layer, 1
    keeping that layer's `down_proj` in fp32. Empty (the default, and what all zeros become) quantizes
    every `down_proj`; it is left out of `to_dict` then. Weights and checkpoints do not depend on it.
    """

    num_layers: int
    layers: tuple[int, ...]
    mlp: tuple[int, ...]
    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    fp32_down: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise HwnasError(f"SubnetConfig.num_layers must be a positive integer, got {self.num_layers!r}")
        for name in ("layers", *_PER_LAYER):
            object.__setattr__(self, name, _int_tuple(name, getattr(self, name)))
        if not self.layers:
            raise HwnasError("SubnetConfig.layers is empty: all layers dropped; keep at least one layer")
        bad = [i for i in self.layers if not 0 <= i < self.num_layers]
        if bad:
            raise HwnasError(f"SubnetConfig.layers has index {bad[0]}, expected 0..{self.num_layers - 1}")
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise HwnasError(f"SubnetConfig.layers must be strictly increasing, got {list(self.layers)}")
        for name in _PER_LAYER:
            values = getattr(self, name)
            if len(values) != len(self.layers):
                raise HwnasError(
                    f"SubnetConfig.{name} has {len(values)} entries, expected one per kept layer ({len(self.layers)})"
                )
            for layer, v in zip(self.layers, values):
                if v < 1:
                    raise HwnasError(f"layer {layer}: {name} must be at least 1, got {v}")
        for layer, h, kv in zip(self.layers, self.heads, self.kv_heads):
            if h % kv:
                raise HwnasError(
                    f"layer {layer}: {h} query heads do not divide into {kv} KV groups; "
                    f"expected a multiple of {kv}"
                )
        self._check_fp32_down()

    def _check_fp32_down(self) -> None:
        down = _int_tuple("fp32_down", self.fp32_down)
        if down and len(down) != len(self.layers):
            raise HwnasError(f"SubnetConfig.fp32_down has {len(down)} entries, expected none or one per kept layer "
                             f"({len(self.layers)})")
        bad = [(layer, v) for layer, v in zip(self.layers, down) if v not in (0, 1)]
        if bad:
            raise HwnasError(f"layer {bad[0][0]}: fp32_down must be 0 (int8 down_proj) or 1 (fp32), got {bad[0][1]}")
        object.__setattr__(self, "fp32_down", down if any(down) else ())

    @property
    def fp32_down_mask(self) -> tuple[bool, ...]:
        """Per kept layer: whether its `down_proj` stays fp32 under int8 deployment."""
        return tuple(bool(v) for v in self.fp32_down) or (False,) * self.depth

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def is_uniform(self) -> bool:
        """True when every kept layer has the same shape (a plain Llama checkpoint can hold it)."""
        return all(len(set(getattr(self, name))) == 1 for name in _PER_LAYER)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
             for f in dataclasses.fields(self)}
        if not self.fp32_down:
            del d["fp32_down"]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SubnetConfig":
        if not isinstance(data, Mapping):
            raise HwnasError(f"a sub-network config must be a JSON object, got {type(data).__name__}")
        fields = dataclasses.fields(cls)
        names = [f.name for f in fields]
        missing = [f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING]
        unknown = sorted(set(data) - set(names), key=str)  # keys of a Python dict may mix types
        if missing or unknown:
            raise HwnasError(
                f"sub-network config has missing keys {missing} and unknown keys {unknown}; expected {names} "
                "(fp32_down optional)"
            )
        return cls(**{n: data[n] for n in names if n in data})

    def to_json(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | Path, pick: int | None = None) -> "SubnetConfig":
        """Read a config file, or member `pick` of a search's pareto.json (default: its selected winner,
        else its lowest-KL member)."""
        try:
            if pick is not None and (isinstance(pick, bool) or not isinstance(pick, int)):
                raise HwnasError(f"--pick must be an integer index into the Pareto front, got {pick!r}")
            data = _read_json(path)
            if isinstance(data, Mapping) and "selected" in data and pick is None:
                return cls.from_dict(_config_of(data["selected"], "selected"))
            if isinstance(data, Mapping) and "front" in data:
                return cls.from_dict(_front_config(data["front"], pick))
            if pick is not None:
                raise HwnasError("--pick selects a member of a search's pareto.json; this is a single config")
            return cls.from_dict(data)
        except HwnasError as e:
            if str(path) in str(e):
                raise
            raise HwnasError(f"{path}: {e}") from None


def _read_json(path: str | Path) -> Any:
    """`read_json`, with what it lets through (json's integer-digit limit, deep nesting, unreadable files) as
    an HwnasError too."""
    try:
        return read_json(path, "sub-network config")
    except HwnasError:
        raise
    except (ValueError, RecursionError, OSError) as e:
        raise HwnasError(f"sub-network config {path} is not readable JSON: {' '.join(str(e).split())[:120]}") from None


def _config_of(member: Any, where: str) -> Any:
    if not isinstance(member, Mapping) or "config" not in member:
        raise HwnasError(f"{where} must be an object with a 'config', got {_short(member)}")
    return member["config"]


def _front_config(front: Any, pick: int | None) -> Any:
    """The config of member `pick` of a pareto.json's front; without `pick`, of its lowest-KL member."""
    if not isinstance(front, list) or not front:
        raise HwnasError(f"the Pareto front must be a non-empty list of members, got {_short(front)}")
    if pick is not None:
        if not 0 <= pick < len(front):  # a negative pick is refused, not taken as a Python index from the end
            raise HwnasError(f"--pick {pick} is out of range; expected 0..{len(front) - 1} "
                             f"(the front has {len(front)} members)")
        return _config_of(front[pick], f"front[{pick}]")
    kls = []
    for i, m in enumerate(front):
        kl = m.get("kl", 0.0) if isinstance(m, Mapping) else None
        if isinstance(kl, bool) or not isinstance(kl, (int, float)):
            raise HwnasError(f"front[{i}] must be an object with a numeric 'kl', got {_short(m)}")
        kls.append(kl)
    best = min(range(len(front)), key=kls.__getitem__)
    return _config_of(front[best], f"front[{best}]")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class SearchSpace:
    """The choices a supernet offers, the same for every layer.

    Heads are pruned as `kv_heads * q_per_kv`: models with grouped-query attention keep their KV
    heads and prune query heads within each group; models without it (one query head per group,
    such as LLaMA2-7B) prune whole KV groups instead.
    """

    num_layers: int
    mlp_choices: tuple[int, ...]
    kv_head_choices: tuple[int, ...]
    q_per_kv_choices: tuple[int, ...]
    min_layers: int = 1

    def __post_init__(self) -> None:
        for name in ("mlp_choices", "kv_head_choices", "q_per_kv_choices"):
            values = tuple(sorted(set(_int_tuple(name, getattr(self, name)))))
            if not values or values[0] < 1:
                raise HwnasError(f"SearchSpace.{name} must be a non-empty list of positive integers, got {values}")
            object.__setattr__(self, name, values)
        if not 1 <= self.min_layers <= self.num_layers:
            raise HwnasError(f"SearchSpace.min_layers must be in 1..{self.num_layers}, got {self.min_layers}")

    @classmethod
    def for_model(
        cls,
        *,
        num_layers: int,
        intermediate_size: int,
        num_heads: int,
        num_kv_heads: int,
        mlp_step: int = 64,
        min_layers: int = 1,
    ) -> "SearchSpace":
        """Default space: MLP widths in multiples of `mlp_step` up to the full width, heads as above."""
        sizes = {"num_layers": num_layers, "intermediate_size": intermediate_size, "num_heads": num_heads,
                 "num_kv_heads": num_kv_heads, "mlp_step": mlp_step}
        for name, v in sizes.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise HwnasError(f"{name} must be a positive integer, got {v!r}")
            if v > _LIMITS.get(name, v):
                raise HwnasError(f"{name} is {v}; expected at most {_LIMITS[name]}")
        if intermediate_size // mlp_step > _MAX_MLP_CHOICES:
            raise HwnasError(f"mlp_step {mlp_step} splits intermediate_size {intermediate_size} into "
                             f"{intermediate_size // mlp_step} widths; expected at most {_MAX_MLP_CHOICES} "
                             "(a larger step)")
        if num_heads % num_kv_heads:
            raise HwnasError(f"model has {num_heads} heads, not a multiple of its {num_kv_heads} KV heads")
        mlp = tuple(range(mlp_step, intermediate_size + 1, mlp_step)) or (intermediate_size,)
        mlp = tuple(sorted(set(mlp) | {intermediate_size}))
        ratio = num_heads // num_kv_heads
        if ratio > 1:  # grouped-query attention: keep the KV heads, prune query heads within groups
            kv, q = (num_kv_heads,), tuple(range(1, ratio + 1))
        else:  # multi-head attention: prune whole KV groups, in steps of an eighth of the heads
            step = max(1, num_kv_heads // 8)
            kv, q = tuple(sorted(set(range(step, num_kv_heads + 1, step)) | {num_kv_heads})), (1,)
        return cls(num_layers, mlp, kv, q, min_layers)

    @classmethod
    def from_hf_config(cls, config: Any, *, mlp_step: int = 64, min_layers: int = 1) -> "SearchSpace":
        """The default space of a Llama config (a `LlamaConfig` or its config.json as a dict)."""
        get = config.get if isinstance(config, Mapping) else lambda k, default=None: getattr(config, k, default)
        try:
            heads = int(get("num_attention_heads"))
            return cls.for_model(
                num_layers=int(get("num_hidden_layers")),
                intermediate_size=int(get("intermediate_size")),
                num_heads=heads,
                num_kv_heads=int(get("num_key_value_heads") or heads),
                mlp_step=mlp_step,
                min_layers=min_layers,
            )
        except (TypeError, ValueError, OverflowError) as e:  # OverflowError: int(inf)
            if isinstance(e, HwnasError):
                raise
            raise HwnasError(f"model config lacks or mistypes a Llama size field: {e}") from None

    @property
    def head_choices(self) -> tuple[int, ...]:
        return tuple(sorted({kv * q for kv in self.kv_head_choices for q in self.q_per_kv_choices}))

    @property
    def choices_per_layer(self) -> int:
        return len(self.mlp_choices) * len(self.kv_head_choices) * len(self.q_per_kv_choices)

    def size(self) -> int:
        """Number of distinct sub-networks: every kept-layer subset times every per-layer shape."""
        n = self.choices_per_layer
        return sum(math.comb(self.num_layers, k) * n**k for k in range(self.min_layers, self.num_layers + 1))

    def _uniform(self, mlp: int, kv: int, q: int) -> SubnetConfig:
        L = self.num_layers
        return SubnetConfig(L, tuple(range(L)), (mlp,) * L, (kv * q,) * L, (kv,) * L)

    def max_config(self) -> SubnetConfig:
        return self._uniform(self.mlp_choices[-1], self.kv_head_choices[-1], self.q_per_kv_choices[-1])

    def min_config(self) -> SubnetConfig:
        cfg = self._uniform(self.mlp_choices[0], self.kv_head_choices[0], self.q_per_kv_choices[0])
        return dataclasses.replace(
            cfg,
            layers=cfg.layers[: self.min_layers],
            mlp=cfg.mlp[: self.min_layers],
            heads=cfg.heads[: self.min_layers],
            kv_heads=cfg.kv_heads[: self.min_layers],
        )

    def sample(self, seed: int | None = None) -> SubnetConfig:
        """A random valid sub-network; the depth is drawn uniformly so samples spread across sizes."""
        rng = random.Random(seed)
        depth = rng.randint(self.min_layers, self.num_layers)
        layers = sorted(rng.sample(range(self.num_layers), depth))
        kv = [rng.choice(self.kv_head_choices) for _ in layers]
        q = [rng.choice(self.q_per_kv_choices) for _ in layers]
        mlp = [rng.choice(self.mlp_choices) for _ in layers]
        return SubnetConfig(self.num_layers, tuple(layers), tuple(mlp), tuple(k * r for k, r in zip(kv, q)), tuple(kv))

    def validate(self, cfg: SubnetConfig) -> SubnetConfig:
        """Raise `HwnasError` naming the first value of `cfg` that this space does not allow."""
        if not isinstance(cfg, SubnetConfig):
            raise HwnasError(f"expected a SubnetConfig, got {type(cfg).__name__}")
        if cfg.num_layers != self.num_layers:
            raise HwnasError(
                f"sub-network config is for a {cfg.num_layers}-layer model, but this model has {self.num_layers} layers"
            )
        if cfg.depth < self.min_layers:
            raise HwnasError(f"sub-network keeps {cfg.depth} layers, the space needs at least {self.min_layers}")
        for layer, mlp, h, kv in zip(cfg.layers, cfg.mlp, cfg.heads, cfg.kv_heads):
            if mlp not in self.mlp_choices:
                raise HwnasError(f"layer {layer}: MLP width {mlp} is not a choice; expected one of {list(self.mlp_choices)}")
            if kv not in self.kv_head_choices:
                raise HwnasError(
                    f"layer {layer}: {kv} KV heads is not a choice; expected one of {list(self.kv_head_choices)}"
                )
            if h // kv not in self.q_per_kv_choices:
                allowed = [kv * q for q in self.q_per_kv_choices]
                raise HwnasError(f"layer {layer}: {h} query heads with {kv} KV heads is not a choice; expected one of {allowed}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)}
        d["head_choices"] = list(self.head_choices)
        return d
