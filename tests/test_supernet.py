import dataclasses

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from hwnas import HwnasError, HwnasLlamaForCausalLM, Supernet, SubnetConfig
from hwnas.loading import load_model
from hwnas.elastic import ElasticLinear

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 31, 64, 128, 11, 2]])


def calibrated(path) -> Supernet:
    model, tok = load_model(path)
    sn = Supernet(model, tok, name=str(path))
    torch.manual_seed(1)
    sn.calibrate(torch.randint(0, model.config.vocab_size, (4, 32)))
    return sn


def configs(sn: Supernet) -> list[SubnetConfig]:
    s = sn.search_space
    L = s.num_layers
    smallest = dataclasses.replace(s.min_config(), layers=(L - 1,))  # drops layer 0: KV cache renumbered
    uniform = SubnetConfig(L, (0, 2, 3), (s.mlp_choices[1],) * 3, (s.head_choices[0],) * 3,
                           (s.kv_head_choices[0],) * 3)
    return [smallest, uniform] + [s.sample(seed) for seed in range(4)]


def test_reordering_keeps_the_full_output_and_is_a_real_permutation(variant_dir):
    model, tok = load_model(variant_dir)
    ref = model(IDS).logits
    sn = Supernet(model, tok)
    torch.manual_seed(1)
    batch = torch.randint(0, model.config.vocab_size, (4, 32))
    order = sn.calibrate(batch)
    # float32 sums in a permuted order: up to 2e-5 on logits of 7.5 with MKL on an AVX-512 Xeon
    assert torch.allclose(sn(IDS).logits, ref, atol=1e-4)
    assert any(p != sorted(p) for p in order["mlp"]), "calibration reordered nothing"
    # after reordering, every prefix holds the highest scores: a second pass on the same text finds them sorted
    again = sn.calibrate(batch)
    for key in ("mlp_scores", "head_scores"):
        for scores in again[key]:
            s = torch.tensor(scores)
            if key == "head_scores" and model.config.num_key_value_heads < model.config.num_attention_heads:
                s = s.view(model.config.num_key_value_heads, -1)  # GQA: sorted within each KV group
            assert (s[..., :-1] >= s[..., 1:] - 1e-6 * s.max()).all()
    assert len(order["block_influence"]) == model.config.num_hidden_layers


def test_set_max_is_the_original_model(tiny_model):
    model, tok = load_model(tiny_model)
    ref = model(IDS).logits
    sn = Supernet(model, tok)
    sn.set_active(sn.search_space.sample(3))
    sn.set_max()
    assert torch.equal(sn(IDS).logits, ref)


def test_extracted_models_match_the_active_supernet(variant_dir, tmp_path):
    sn = calibrated(variant_dir)
    for i, cfg in enumerate(configs(sn)):
        sn.set_active(cfg)
        active = sn(IDS).logits
        sub = sn.extract(cfg)
        assert isinstance(sub, HwnasLlamaForCausalLM) != cfg.is_uniform
        assert (sub(IDS).logits - active).abs().max() <= 1e-4
        assert sum(p.numel() for p in sub.parameters()) == sn.num_parameters_of(cfg)
        sub.save_pretrained(tmp_path / str(i))
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / str(i))
        assert (reloaded(IDS).logits - active).abs().max() <= 1e-4
        assert reloaded.config.model_type == ("llama" if cfg.is_uniform else "hwnas_llama")


def test_uniform_subnet_is_a_plain_llama_checkpoint(tiny_model, tmp_path):
    sn = calibrated(tiny_model)
    s = sn.search_space
    cfg = SubnetConfig(4, (1, 2), (128, 128), (2, 2), (2, 2))
    sn.extract(cfg).save_pretrained(tmp_path)
    plain = LlamaForCausalLM.from_pretrained(tmp_path)  # no hwnas class involved
    assert type(plain) is LlamaForCausalLM
    c = plain.config
    assert (c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (2, 128, 2, 2)
    assert c.head_dim == 16 and s.num_layers == 4
    sn.set_active(cfg)
    assert (plain(IDS).logits - sn(IDS).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_matches_with_and_without_kv_cache(variant_dir, use_cache):
    sn = calibrated(variant_dir)
    for cfg in configs(sn)[:3]:
        sn.set_active(cfg)
        kw = dict(max_new_tokens=8, do_sample=False, use_cache=use_cache, output_scores=True,
                  return_dict_in_generate=True, pad_token_id=0)
        a = sn.generate(IDS[:, :5], **kw)
        b = sn.extract(cfg).generate(IDS[:, :5], **kw)
        assert torch.equal(a.sequences, b.sequences)
        assert max((x - y).abs().max().item() for x, y in zip(a.scores, b.scores)) <= 1e-4
    # cached and uncached decoding agree too
    sn.set_active(configs(sn)[0])
    c = sn.generate(IDS[:, :5], max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    n = sn.generate(IDS[:, :5], max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(c, n)


def test_activation_shares_weights_without_copies(tiny_model):
    sn = calibrated(tiny_model)
    params = {id(p): p.data_ptr() for p in sn.parameters()}
    numel = sum(p.numel() for p in sn.parameters())
    for seed in range(20):
        sn.set_active(sn.search_space.sample(seed))
        sn(IDS)
    assert {id(p): p.data_ptr() for p in sn.parameters()} == params
    assert sum(p.numel() for p in sn.parameters()) == numel
    cfg = SubnetConfig(4, (0,), (64,), (4,), (2,))
    sn.set_active(cfg)
    gate = sn.all_layers[0].mlp.gate_proj
    assert isinstance(gate, ElasticLinear)
    assert gate.active_weight()[0].data_ptr() == gate.weight.data_ptr()  # a view, not a copy
    assert gate.active_weight()[0].shape == (64, 64)
    assert len(sn.model.model.layers) == 1 and sn.model.model.layers[0].self_attn.layer_idx == 0


def test_importance_lost_is_what_the_active_prefixes_cut(variant_dir):
    model, tok = load_model(variant_dir)
    sn = Supernet(model, tok)
    cfg0 = configs(sn)[0]
    assert sn.importance_lost(cfg0) is None  # not calibrated: no scores
    torch.manual_seed(1)
    batch = torch.randint(0, model.config.vocab_size, (4, 32))
    sn.calibrate(batch)
    cfgs = configs(sn)
    lost = [sn.importance_lost(c) for c in cfgs]
    assert (sn.importance_lost(sn.search_space.max_config()) == 0).all()
    # the same scores measured again on the reordered weights: the kept units are the prefixes set_active uses
    again = sn.calibrate(batch)
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    for cfg, got in zip(cfgs, lost):
        assert got.shape == (3, model.config.num_hidden_layers)
        for layer in range(model.config.num_hidden_layers):
            if layer not in cfg.layers:
                assert got[:, layer] == pytest.approx([again["block_influence"][layer], 0, 0])
                continue
            i = cfg.layers.index(layer)
            ms, hs = torch.tensor(again["mlp_scores"][layer]), torch.tensor(again["head_scores"][layer])
            kept_heads = hs.view(-1, group)[:cfg.kv_heads[i], :cfg.heads[i] // cfg.kv_heads[i]].sum()
            want = [0, 1 - float(ms[:cfg.mlp[i]].sum() / ms.sum()), 1 - float(kept_heads / hs.sum())]
            assert got[:, layer] == pytest.approx(want, abs=1e-5)
    assert any(got[1].max() > 0 for got in lost) and any(got[2].max() > 0 for got in lost)


def test_mha_prunes_whole_kv_groups_per_layer(tiny_models):
    sn = calibrated(tiny_models["mha"])
    assert sn.search_space.q_per_kv_choices == (1,) and sn.search_space.kv_head_choices == (1, 2, 3, 4)
    cfg = SubnetConfig(4, (0, 1, 3), (256, 64, 128), (1, 3, 4), (1, 3, 4))
    sub = sn.extract(cfg)
    shapes = [s["num_key_value_heads"] for s in sub.config.layer_shapes]
    assert shapes == [1, 3, 4]
    assert sub.model.layers[1].self_attn.k_proj.weight.shape == (48, 64)
    sn.set_active(cfg)
    assert (sub(IDS).logits - sn(IDS).logits).abs().max() <= 1e-4


def test_bad_configs_are_refused(tiny_model):
    sn = calibrated(tiny_model)
    with pytest.raises(HwnasError, match="30-layer model, but this model has 4 layers"):
        sn.set_active(SubnetConfig(30, (0,), (64,), (2,), (2,)))
    with pytest.raises(HwnasError, match="MLP width 100 is not a choice"):
        sn.extract(SubnetConfig(4, (0,), (100,), (2,), (2,)))
    with pytest.raises(HwnasError, match="not match this model's layer count"):
        sn.apply_order({"mlp": [], "heads": []})


def test_from_pretrained_caches_the_importance_order(tiny_model, hwnas_home):
    a = Supernet.from_pretrained(tiny_model)
    cached = list((hwnas_home / "importance").glob("*.json"))
    assert cached
    b = Supernet.from_pretrained(tiny_model)
    assert list((hwnas_home / "importance").glob("*.json")) == cached
    cfg = a.search_space.sample(5)
    a.set_active(cfg)
    b.set_active(cfg)
    assert torch.equal(a(IDS).logits, b(IDS).logits)
    assert a.layer_importance == b.layer_importance and a.layer_importance is not None


def test_export_orders_channels_by_the_calibration_its_search_recorded(tiny_model, tmp_path):
    import json

    from safetensors.torch import load_file

    from hwnas.export import export_checkpoint
    from hwnas.supernet import Calibration

    BOOKS_CALIBRATION = Calibration(source="lambada")

    assert Calibration.from_key(Calibration().key()) == Calibration()
    assert Calibration.from_key(BOOKS_CALIBRATION.key()) == BOOKS_CALIBRATION
    books, mixed = Supernet.from_pretrained(tiny_model, calibration=BOOKS_CALIBRATION), Supernet.from_pretrained(tiny_model)
    assert mixed.calibration == Calibration() and books.calibration == BOOKS_CALIBRATION
    cfg = books.search_space.sample(2)
    front = {"front": [{"kl": 1.0, "config": cfg.to_dict()}]}
    want = {n: {k: v.clone() for k, v in sn.extract(cfg).state_dict().items()} for n, sn in
            (("books", books), ("mixed", mixed))}
    assert any(not torch.equal(want["books"][k], want["mixed"][k]) for k in want["books"])  # the orders differ
    for name, pareto in (("books", {**front, "calibration": BOOKS_CALIBRATION.key()}),
                         ("mixed", {**front, "calibration": Calibration().key()})):
        path = tmp_path / "pareto.json"
        path.write_text(json.dumps(pareto))
        report = export_checkpoint(model=str(tiny_model), subnet=path, out=tmp_path / "ckpt", overwrite=True)
        got = load_file(tmp_path / "ckpt" / "model.safetensors")
        assert report["channel_order"] == (BOOKS_CALIBRATION if name == "books" else Calibration()).key()
        assert all(torch.equal(got[k], want[name][k]) for k in got), name
    path.write_text(json.dumps(front))  # a front that does not name its calibration is refused, not guessed
    with pytest.raises(HwnasError, match="names no calibration"):
        export_checkpoint(model=str(tiny_model), subnet=path, out=tmp_path / "x")
    path.write_text(json.dumps({**front, "calibration": BOOKS_CALIBRATION.key()}))
    with pytest.raises(HwnasError, match="indexes channels ordered by lambada-calibration-16x256, the supernet given "
                                         "by lambada\\+coqa-calibration"):
        export_checkpoint(model=str(tiny_model), subnet=path, out=tmp_path / "x", supernet=mixed)
    assert not (tmp_path / "x").exists()
    path.write_text(json.dumps({**front, "calibration": "wikitext-16x256"}))
    with pytest.raises(HwnasError, match="calibration 'wikitext-16x256' is not known"):
        export_checkpoint(model=str(tiny_model), subnet=path, out=tmp_path / "x")


def test_half_precision_supernet_extracts_in_its_own_dtype(tiny_model):
    sn = Supernet.from_pretrained(tiny_model, dtype="bfloat16")
    cfg = sn.search_space.sample(2)
    sn.set_active(cfg)
    sub = sn.extract(cfg)
    assert sub.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in sub.parameters())
    assert torch.equal(sub(IDS).logits, sn(IDS).logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_supernet_on_cuda_in_half_precision(tiny_model):
    sn = Supernet.from_pretrained(tiny_model, dtype="float16", device="cuda")
    ids = IDS.cuda()
    for seed in range(3):
        cfg = sn.search_space.sample(seed)
        sn.set_active(cfg)
        sub = sn.extract(cfg)
        assert sub.device.type == "cuda" and sub.dtype == torch.float16
        assert (sub(ids).logits - sn(ids).logits).abs().max() <= 1e-2


# -- supernet folders (Supernet.save_pretrained) ---------------------------------------------------------------
def _trained_copy(path) -> Supernet:
    """A calibrated supernet whose weights moved away from the source model's (as training moves them)."""
    sn = Supernet.from_pretrained(path)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sn.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return sn


@pytest.mark.parametrize("variant", ["gqa", "bias"])
def test_supernet_folder_reloads_as_saved_without_calibrating_again(variant, tiny_models, tmp_path, hwnas_home):
    import json

    from hwnas.supernet import SUPERNET_FILE, Calibration

    BOOKS_CALIBRATION = Calibration(source="lambada")

    sn = _trained_copy(tiny_models[variant])
    sn.save_pretrained(tmp_path / "sn", tokens=123)
    record = json.loads((tmp_path / "sn" / SUPERNET_FILE).read_text())
    assert record["format"] == 1 and record["mlp_step"] == 64 and record["tokens"] == 123
    assert record["search_space"] == sn.search_space.to_dict() and record["calibration"] == Calibration().key()
    cached = sorted((hwnas_home / "importance").glob("*.json"))
    # whatever calibration it is asked for, the folder keeps the order its weights are in
    for calibration in (Calibration(), BOOKS_CALIBRATION, None):
        again = Supernet.from_pretrained(tmp_path / "sn", calibration=calibration)
        assert again.calibration == Calibration() and again.mlp_step == 64
        assert again.layer_importance == pytest.approx(sn.layer_importance)
        for cfg in configs(sn):
            sn.set_active(cfg)
            again.set_active(cfg)
            assert torch.equal(sn(IDS).logits, again(IDS).logits)
            assert np.allclose(sn.importance_lost(cfg), again.importance_lost(cfg))
    assert sorted((hwnas_home / "importance").glob("*.json")) == cached  # nothing calibrated
    # the weights are a plain Llama checkpoint of the full model
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "sn")
    sn.set_max()
    assert type(plain) is LlamaForCausalLM and torch.equal(plain(IDS).logits, sn(IDS).logits)


def test_supernet_folder_of_another_search_space_is_refused(tiny_model, tmp_path):
    import json

    from hwnas.supernet import SUPERNET_FILE

    sn = Supernet.from_pretrained(tiny_model)
    sn.save_pretrained(tmp_path / "sn")
    assert Supernet.from_pretrained(tmp_path / "sn", mlp_step=64).mlp_step == 64
    with pytest.raises(HwnasError, match=r"trained for the search space of mlp_step 64 \(MLP widths \[64, 128, 192, "
                                         r"256\]\); asked for mlp_step 128"):
        Supernet.from_pretrained(tmp_path / "sn", mlp_step=128)
    record = json.loads((tmp_path / "sn" / SUPERNET_FILE).read_text())
    (tmp_path / "sn" / SUPERNET_FILE).write_text(json.dumps({**record, "format": 2}))
    with pytest.raises(HwnasError, match="has format 2; expected 1"):
        Supernet.from_pretrained(tmp_path / "sn")
    (tmp_path / "sn" / SUPERNET_FILE).write_text(json.dumps({**record, "search_space": {**record["search_space"],
                                                                                         "num_layers": 5}}))
    with pytest.raises(HwnasError, match="the folder is inconsistent"):
        Supernet.from_pretrained(tmp_path / "sn")
    with pytest.raises(HwnasError, match="no importance scores to save"):
        Supernet.from_pretrained(tiny_model, calibration=None).save_pretrained(tmp_path / "x")
