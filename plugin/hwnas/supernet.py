"""The elastic LLaMA supernet: one pretrained model, every sub-network of its search space.

Activating a sub-network only changes which slices of the shared weights the forward pass uses
(`ElasticLinear`), and which decoder layers run. Channels are ordered by importance beforehand,
so every prefix slice keeps the most important units. A trained supernet is saved as a folder
(`Supernet.save_pretrained`) whose weights are already in that order, with its record (`SUPERNET_FILE`).
"""
from __future__ import annotations

import copy
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from .progress import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from .common import HwnasError, atomic_write_json, home, read_json
from .data import CALIBRATION_SOURCES
from .elastic import ElasticEmbedding, ElasticLinear, OrtInt8, Selection
from .modeling import model_class, subnet_model_config
from .space import SearchSpace, SubnetConfig

logger = logging.getLogger(__name__)

SUPERNET_FILE = "hwnas_supernet.json"  # a supernet folder's record: search space, importance scores, training
SUPERNET_FORMAT = 1


@dataclass(frozen=True)
class Calibration:
    """How importance scores are computed: calibration text (`source`, one of CALIBRATION_SOURCES), packed
    into sequences."""

    num_sequences: int = 16
    seq_len: int = 256
    source: str = "mixed"

    def __post_init__(self) -> None:
        if self.source not in CALIBRATION_SOURCES:
            raise HwnasError(f"calibration source {self.source!r} is not known; expected one of "
                             f"{list(CALIBRATION_SOURCES)}")

    def key(self) -> str:
        prefix = "lambada" if self.source == "lambada" else "lambada+coqa"
        return f"{prefix}-calibration-{self.num_sequences}x{self.seq_len}"

    @classmethod
    def from_key(cls, key: str) -> "Calibration":
        """The calibration whose `key()` is `key` (as a search's pareto.json records it)."""
        m = re.fullmatch(r"(lambada|lambada\+coqa)-calibration-(\d{1,9})x(\d{1,9})", str(key))  # int() stays exact
        if m is None:
            raise HwnasError(f"calibration {key!r} is not known; expected lambada-calibration-NxL or "
                             "lambada+coqa-calibration-NxL")
        return cls(int(m[2]), int(m[3]), "lambada" if m[1] == "lambada" else "mixed")


def recorded_calibration(record: dict) -> Calibration:
    """The calibration a search's pareto.json or a compare.json names: their configs index channels in its order."""
    if "calibration" not in record:
        raise HwnasError("the record names no calibration, so the channels its configs index are unknown; expected "
                         "a pareto.json or compare.json written by this hwnas (search again)")
    return Calibration.from_key(record["calibration"])


def calibration_batches(tokenizer: PreTrainedTokenizerBase, spec: Calibration, *, from_end: bool = False) -> torch.Tensor:
    """Token ids (num_sequences, seq_len) of `spec.source`'s text, each source's passages packed end to end,
    the sources taking turns by sequence (LAMBADA's calibration split, never its test split; CoQA).

    The importance order reads each source from its start; `from_end` reads it from its end, for a
    second use (the search's quality objective) that should not reuse the same passages.
    """
    from .data import coqa_calibration_stories, lambada_texts

    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    streams = [lambada_texts("calibration")] + ([coqa_calibration_stories()] if spec.source == "mixed" else [])
    per = -(-spec.num_sequences // len(streams))  # sequences each source gives at most
    packed = []
    for texts in streams:
        ids: list[int] = []
        need = per * spec.seq_len
        for text in reversed(texts) if from_end else texts:
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + sep
            if len(ids) >= need:
                break
        if len(ids) < need:
            raise HwnasError(f"calibration text gives {len(ids)} tokens, {need} needed ({spec})")
        packed.append(torch.tensor(ids[:need]).view(per, spec.seq_len))
    rows = [packed[k % len(streams)][k // len(streams)] for k in range(spec.num_sequences)]
    return torch.stack(rows)


def _fingerprint(model_dir: Path, spec: Calibration) -> str:
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    h.update(spec.key().encode())
    return h.hexdigest()[:16]


class Supernet(nn.Module):
    """A `LlamaForCausalLM` made elastic in depth, MLP width and attention heads."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        name: str | None = None,
        mlp_step: int = 64,
    ) -> None:
        super().__init__()
        c = model.config
        self.model, self.tokenizer, self.name, self.mlp_step = model, tokenizer, name, mlp_step
        self.base_config = copy.deepcopy(c)
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.search_space = SearchSpace.from_hf_config(c, mlp_step=mlp_step)
        self.all_layers = nn.ModuleList(model.model.layers)  # the full stack; model.model.layers is the active one
        for layer in self.all_layers:
            for parent, names in ((layer.mlp, ("gate_proj", "up_proj", "down_proj")),
                                  (layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj"))):
                for n in names:
                    setattr(parent, n, ElasticLinear(getattr(parent, n)))
        model.lm_head = ElasticLinear(model.lm_head)  # the same (possibly tied) weight; quantized under `quant`
        model.model.embed_tokens = ElasticEmbedding(model.model.embed_tokens)
        self.calibration: Calibration | None = None  # what ordered the channels (None: the checkpoint's order)
        self.layer_importance: list[float] | None = None  # Block Influence per layer, once calibrated
        self.scores: dict[str, Any] | None = None  # the importance scores in the weights' order (see set_scores)
        self._cut: list[tuple[np.ndarray, np.ndarray]] | None = None  # per layer, see importance_lost
        self._active: SubnetConfig | None = None
        self._quant: OrtInt8 | None = None
        self.set_max()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = "smollm2-135m",
        *,
        dtype: str = "float32",
        device: str = "cpu",
        calibration: Calibration | None = Calibration(),
        mlp_step: int | None = None,
    ) -> "Supernet":
        """Load a Llama folder (or the default by name) and order its channels by importance.

        The importance order is computed once per model and calibration setting, then cached
        under the hwnas folder, so every later load gives the same sub-networks.
        `calibration=None` keeps the checkpoint's own order. `mlp_step` defaults to 64.

        A supernet folder (one `save_pretrained` wrote, with `SUPERNET_FILE`) is already in its importance
        order: it loads with its recorded order, scores and calibration whatever `calibration` says (its
        weights were trained in that order), and is refused if `mlp_step` asks for another search space.
        """
        from .loading import load_model, resolve_model

        path = resolve_model(name_or_path)
        if (path / SUPERNET_FILE).is_file():
            return cls._from_supernet_folder(path, str(name_or_path), dtype=dtype, device=device, mlp_step=mlp_step)
        model, tokenizer = load_model(path, dtype=dtype, device=device)
        sn = cls(model, tokenizer, name=str(name_or_path), mlp_step=64 if mlp_step is None else mlp_step)
        sn.calibration = calibration
        if calibration is not None:
            cache = home() / "importance" / f"{_fingerprint(path, calibration)}.json"
            if cache.is_file():
                sn.apply_order(read_json(cache, "cached importance order"))
            else:
                if tokenizer is None:
                    raise HwnasError(f"{path} has no tokenizer, which importance calibration needs")
                order = sn.calibrate(calibration_batches(tokenizer, calibration))
                atomic_write_json(cache, order)
        return sn

    @classmethod
    def _from_supernet_folder(cls, path: Path, name: str, *, dtype: str, device: str,
                              mlp_step: int | None) -> "Supernet":
        from .loading import load_model

        record = read_supernet_record(path)
        if mlp_step is not None and mlp_step != record["mlp_step"]:
            raise HwnasError(f"{path} is a supernet trained for the search space of mlp_step {record['mlp_step']} "
                             f"(MLP widths {record['search_space']['mlp_choices']}); asked for mlp_step {mlp_step}")
        model, tokenizer = load_model(path, dtype=dtype, device=device)
        sn = cls(model, tokenizer, name=name, mlp_step=record["mlp_step"])
        if sn.search_space.to_dict() != record["search_space"]:
            raise HwnasError(f"{path}: its config.json gives the search space {sn.search_space.to_dict()}, its "
                             f"{SUPERNET_FILE} records {record['search_space']}; the folder is inconsistent")
        sn.calibration = Calibration.from_key(record["calibration"])
        sn.set_scores(record["importance"])
        return sn

    def save_pretrained(self, out: str | Path, **info: Any) -> Path:
        """Write this supernet as a folder that `from_pretrained` loads as it is: the full model's weights (in
        importance order), config and tokenizer, then `SUPERNET_FILE` (the search space, MLP step, calibration,
        importance scores, the source model and `info`), last, so a folder with the record is complete."""
        if self.scores is None or self.calibration is None:
            raise HwnasError("this supernet has no importance scores to save; build it with a calibration "
                             "(Supernet.from_pretrained(..., calibration=Calibration()))")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / SUPERNET_FILE).unlink(missing_ok=True)  # the folder is incomplete until the new record is written
        previous, quant = self.active_config, self.active_quant
        self.set_max()
        try:
            self.model.save_pretrained(out, safe_serialization=True)
        finally:
            self.set_active(previous, quant=quant)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)
        record = {"format": SUPERNET_FORMAT, "source": self.name, "search_space": self.search_space.to_dict(),
                  "mlp_step": self.mlp_step, "calibration": self.calibration.key(),
                  "importance": self.scores, **info}
        atomic_write_json(out / SUPERNET_FILE, record)
        return out

    # -- activation ---------------------------------------------------------------------------
    @property
    def active_config(self) -> SubnetConfig:
        assert self._active is not None
        return self._active

    def set_max(self) -> None:
        self.set_active(self.search_space.max_config())

    @property
    def active_quant(self) -> OrtInt8 | None:
        return self._quant

    def set_active(self, cfg: SubnetConfig, *, quant: OrtInt8 | None = None) -> None:
        """Make the forward pass run sub-network `cfg` (validated against the search space).

        With `quant`, every projection and the LM head compute as that int8 deployment would, except
        the down_proj of layers `cfg.fp32_down` keeps in fp32; the embedding is int8 where `quant` says so.
        """
        self.search_space.validate(cfg)
        c = self.base_config
        d, full_kv = self.head_dim, c.num_key_value_heads
        group = c.num_attention_heads // full_kv
        device = self.model.lm_head.weight.device
        kept = []
        shapes = zip(cfg.layers, cfg.mlp, cfg.heads, cfg.kv_heads, cfg.fp32_down_mask)
        for pos, (idx, mlp, heads, kv, fp32_down) in enumerate(shapes):
            layer = self.all_layers[idx]
            m, a = layer.mlp, layer.self_attn
            for lin in (m.gate_proj, m.up_proj, m.down_proj, a.q_proj, a.k_proj, a.v_proj, a.o_proj):
                lin.quant = quant
            if fp32_down:
                m.down_proj.quant = None
            width = None if mlp == c.intermediate_size else slice(0, mlp)
            m.gate_proj.out_sel = m.up_proj.out_sel = m.down_proj.in_sel = width
            q = heads // kv
            if q == group:  # whole groups: a prefix of the (group-ordered) heads
                q_sel: Selection = None if kv == full_kv else slice(0, kv * group * d)
            else:  # the first q heads of each of the first kv groups
                rows = [(g * group + j) * d + k for g in range(kv) for j in range(q) for k in range(d)]
                q_sel = torch.tensor(rows, device=device)
            a.q_proj.out_sel = a.o_proj.in_sel = q_sel
            a.k_proj.out_sel = a.v_proj.out_sel = None if kv == full_kv else slice(0, kv * d)
            a.num_key_value_groups = q
            a.layer_idx = pos  # the KV cache is indexed by position in the active stack
            kept.append(layer)
        self.model.model.layers = nn.ModuleList(kept)
        self.model.config.num_hidden_layers = len(kept)
        self.model.lm_head.quant = quant
        self.model.model.embed_tokens.quant = quant if quant is not None and quant.int8_embedding else None
        self._active, self._quant = cfg, quant

    def forward(self, input_ids: torch.Tensor, **kwargs: Any):
        return self.model(input_ids=input_ids, **kwargs)

    def generate(self, *args: Any, **kwargs: Any):
        return self.model.generate(*args, **kwargs)

    # -- size ---------------------------------------------------------------------------------
    def num_parameters_of(self, cfg: SubnetConfig) -> int:
        """Parameters of sub-network `cfg` (tied embeddings counted once)."""
        c = self.base_config
        h, d = c.hidden_size, self.head_dim
        fixed = c.vocab_size * h * (1 if c.tie_word_embeddings else 2) + h
        per = 0
        for mlp, heads, kv in zip(cfg.mlp, cfg.heads, cfg.kv_heads):
            per += 3 * h * mlp + (2 * heads + 2 * kv) * d * h + 2 * h
            per += (mlp * 2 + h) * bool(c.mlp_bias) + ((heads + 2 * kv) * d + h) * bool(c.attention_bias)
        return fixed + per

    # -- extraction ---------------------------------------------------------------------------
    @torch.no_grad()
    def extract(self, cfg: SubnetConfig | None = None) -> LlamaForCausalLM:
        """A standalone model holding copies of sub-network `cfg`'s weights (the active one by default)."""
        from transformers.modeling_utils import no_init_weights

        cfg = self.search_space.validate(cfg or self.active_config)
        previous, quant = self.active_config, self.active_quant
        self.set_active(cfg)
        try:
            config = subnet_model_config(self.base_config, cfg, source=self.name)
            config._attn_implementation = self.model.config._attn_implementation
            # built directly in the supernet's dtype and device: no full-precision copy of a 7B model on the host
            with no_init_weights(), torch.device(self.model.device):
                model = model_class(config)._from_config(config, dtype=self.model.dtype)
            state = {}
            for pos, layer in enumerate(self.model.model.layers):
                prefix = f"model.layers.{pos}."
                for name, module in layer.named_modules():
                    if isinstance(module, ElasticLinear):
                        w, b = module.active_weight()
                        state[prefix + name + ".weight"] = w
                        if b is not None:
                            state[prefix + name + ".bias"] = b
                    elif isinstance(module, nn.Module) and not list(module.children()):
                        for pname, p in module.named_parameters(recurse=False):
                            state[f"{prefix}{name}.{pname}"] = p
            state["model.embed_tokens.weight"] = self.model.model.embed_tokens.weight
            state["model.norm.weight"] = self.model.model.norm.weight
            if not config.tie_word_embeddings:
                state["lm_head.weight"] = self.model.lm_head.weight
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
            assert not missing and not unexpected, (missing, unexpected)
            model.tie_weights()
            model.generation_config = copy.deepcopy(self.model.generation_config)
            return model.eval()
        finally:
            self.set_active(previous, quant=quant)

    # -- importance ---------------------------------------------------------------------------
    def importance_lost(self, cfg: SubnetConfig) -> np.ndarray | None:
        """What `cfg` cuts, per layer of the full stack, as a (3, layers) array: the Block Influence of a
        dropped layer, and for a kept one the share of its MLP channel score and of its head score that
        its width and head count remove. None before calibration (no scores)."""
        if self._cut is None or self.layer_importance is None:
            return None
        out = np.zeros((3, len(self.all_layers)))
        out[0] = self.layer_importance
        for idx, mlp, heads, kv in zip(cfg.layers, cfg.mlp, cfg.heads, cfg.kv_heads):
            mlp_cut, head_cut = self._cut[idx]
            out[:, idx] = (0.0, mlp_cut[mlp], head_cut[kv, heads // kv])  # the prefixes set_active keeps
        return out

    @torch.no_grad()
    def calibrate(self, input_ids: torch.Tensor, batch_size: int = 4) -> dict[str, Any]:
        """Score channels and heads on `input_ids` and reorder the weights by importance.

        Scores (Minitron-style, activation-based): an MLP channel's RMS activation times the norm
        of its `down_proj` column; a query head's RMS contribution to the `o_proj` output; a KV
        group's, the sum of its heads'. Layers get their Block Influence (1 - cos(input, output)).
        Returns the order applied, which `apply_order` replays.
        """
        self.set_max()
        c = self.base_config
        d = self.head_dim
        n_heads = c.num_attention_heads
        mlp_sq = [torch.zeros(c.intermediate_size, dtype=torch.float64) for _ in self.all_layers]
        head_sq = [torch.zeros(n_heads, dtype=torch.float64) for _ in self.all_layers]
        bi = torch.zeros(len(self.all_layers), dtype=torch.float64)
        hooks = []

        def on_down(i: int):
            def hook(_mod, args):
                mlp_sq[i] += args[0].double().pow(2).sum(dim=(0, 1)).cpu()
            return hook

        def on_o(i: int, o_proj: ElasticLinear):
            def hook(_mod, args):
                x = args[0].reshape(-1, n_heads, d)
                w = o_proj.weight.view(-1, n_heads, d)  # (hidden, heads, d)
                for h in range(n_heads):
                    head_sq[i][h] += (x[:, h] @ w[:, h].T).double().pow(2).sum().cpu()
            return hook

        def on_layer(i: int):
            def hook(_mod, args, kwargs, out):
                x = args[0] if args else kwargs["hidden_states"]
                y = out[0] if isinstance(out, tuple) else out
                bi[i] += (1 - F.cosine_similarity(x.double(), y.double(), dim=-1)).sum().cpu()
            return hook

        for i, layer in enumerate(self.all_layers):
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
            hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o(i, layer.self_attn.o_proj)))
            hooks.append(layer.register_forward_hook(on_layer(i), with_kwargs=True))
        try:
            device = self.model.lm_head.weight.device
            for start in tqdm(range(0, len(input_ids), batch_size), desc="importance", unit="batch"):
                self.model(input_ids=input_ids[start:start + batch_size].to(device), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        tokens = input_ids.numel()
        order: dict[str, Any] = {"mlp": [], "heads": [], "mlp_scores": [], "head_scores": [],
                                 "block_influence": (bi / tokens).tolist()}
        group = n_heads // c.num_key_value_heads
        elastic_kv = len(self.search_space.kv_head_choices) > 1
        for i, layer in enumerate(self.all_layers):
            down_norm = layer.mlp.down_proj.weight.double().norm(dim=0).cpu()
            score = (mlp_sq[i] / tokens).sqrt() * down_norm
            order["mlp"].append(torch.argsort(score, descending=True, stable=True).tolist())
            order["mlp_scores"].append(score.tolist())  # indexed by the channel's position before reordering
            head_ms = head_sq[i] / tokens
            order["head_scores"].append(head_ms.sqrt().tolist())
            hs = head_ms.view(-1, group)  # (kv groups, heads per group)
            groups = (torch.argsort(hs.sum(1), descending=True, stable=True) if elastic_kv
                      else torch.arange(hs.shape[0])).tolist()
            within = torch.argsort(hs, dim=1, descending=True, stable=True)
            order["heads"].append([g * group + int(j) for g in groups for j in within[g]])
        self.apply_order(order)
        return order

    @torch.no_grad()
    def apply_order(self, order: dict[str, Any]) -> None:
        """Permute every layer's MLP channels and heads into `order` (output unchanged)."""
        c = self.base_config
        d, group = self.head_dim, c.num_attention_heads // c.num_key_value_heads
        if len(order.get("mlp", [])) != len(self.all_layers) or len(order.get("heads", [])) != len(self.all_layers):
            raise HwnasError("importance order does not match this model's layer count; delete the cached order")
        for layer, mlp_perm, head_perm in zip(self.all_layers, order["mlp"], order["heads"]):
            if sorted(mlp_perm) != list(range(c.intermediate_size)) or sorted(head_perm) != list(range(c.num_attention_heads)):
                raise HwnasError("importance order is not a permutation of this model's channels; delete the cached order")
            mp = torch.tensor(mlp_perm, device=layer.mlp.gate_proj.weight.device)
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
                _permute(lin, rows=mp)
            _permute(layer.mlp.down_proj, cols=mp)
            hp = torch.tensor(head_perm)
            q_rows = (hp[:, None] * d + torch.arange(d)).flatten().to(mp.device)
            kv_groups = hp.view(-1, group)[:, 0] // group  # the group each new group slot came from
            kv_rows = (kv_groups[:, None] * d + torch.arange(d)).flatten().to(mp.device)
            a = layer.self_attn
            _permute(a.q_proj, rows=q_rows)
            _permute(a.o_proj, cols=q_rows)
            _permute(a.k_proj, rows=kv_rows)
            _permute(a.v_proj, rows=kv_rows)
        scores = {"block_influence": order.get("block_influence")}
        if order.get("mlp_scores") and order.get("head_scores"):  # orders cached without scores lack them
            for key, perms in (("mlp_scores", order["mlp"]), ("head_scores", order["heads"])):
                scores[key] = [np.asarray(x)[perm].tolist() for x, perm in zip(order[key], perms)]  # weight order
        self.set_scores(scores)

    def set_scores(self, scores: dict[str, Any]) -> None:
        """Take importance scores already in the weights' order (channel i of layer l scored `mlp_scores[l][i]`;
        `head_scores` per query head, `block_influence` per layer), as a supernet folder records them."""
        c = self.base_config
        self.layer_importance = list(scores.get("block_influence") or []) or None
        self._cut, self.scores = None, None
        if scores.get("mlp_scores") and scores.get("head_scores"):
            group = c.num_attention_heads // c.num_key_value_heads
            if len(scores["mlp_scores"]) != len(self.all_layers) or len(scores["head_scores"]) != len(self.all_layers):
                raise HwnasError(f"importance scores are for {len(scores['mlp_scores'])} layers; this model has "
                                 f"{len(self.all_layers)}")
            self._cut = []
            for ms, hs in zip(scores["mlp_scores"], scores["head_scores"]):
                ms, hs = np.asarray(ms, dtype=float), np.asarray(hs, dtype=float).reshape(-1, group)
                mlp_kept = np.concatenate([[0.0], ms.cumsum()])  # [channels]: score kept
                head_kept = np.zeros((hs.shape[0] + 1, group + 1))  # [kv groups, heads per group]: score kept
                head_kept[1:, 1:] = hs.cumsum(0).cumsum(1)
                self._cut.append((1 - mlp_kept / max(mlp_kept[-1], 1e-30),
                                  1 - head_kept / max(head_kept[-1, -1], 1e-30)))
            self.scores = {"mlp_scores": [list(map(float, x)) for x in scores["mlp_scores"]],
                           "head_scores": [list(map(float, x)) for x in scores["head_scores"]],
                           "block_influence": self.layer_importance}
        self.set_active(self.active_config, quant=self.active_quant)


def read_supernet_record(path: str | Path) -> dict[str, Any]:
    """The `SUPERNET_FILE` of supernet folder `path`, checked to hold what `Supernet.from_pretrained` needs."""
    record = read_json(Path(path) / SUPERNET_FILE, "supernet record")
    if not isinstance(record, dict) or record.get("format") != SUPERNET_FORMAT:
        got = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise HwnasError(f"{path}/{SUPERNET_FILE} has format {got!r}; expected {SUPERNET_FORMAT}")
    missing = [k for k in ("search_space", "mlp_step", "calibration", "importance") if k not in record]
    if missing or not isinstance(record["importance"], dict) or record["calibration"] is None:
        raise HwnasError(f"{path}/{SUPERNET_FILE} lacks {missing or ['importance scores or calibration']}; expected "
                         "a record written by Supernet.save_pretrained")
    return record


def _permute(lin: nn.Linear, *, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    if rows is not None:
        lin.weight.data = lin.weight.data[rows].contiguous()
        if lin.bias is not None:
            lin.bias.data = lin.bias.data[rows].contiguous()
    if cols is not None:
        lin.weight.data = lin.weight.data[:, cols].contiguous()
