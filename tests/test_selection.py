import dataclasses
import json

import pytest
import torch

from hwnas import HwnasError, Supernet
from hwnas.pipeline import choose
from hwnas.pruning import layer_drop, least_influential, width_uniform
from hwnas.search import Evaluated, Evaluator, Setup, baseline_rows, run_search, setup
from hwnas.selection import ChoiceNLL, LastWordNLL, TaskNLL, candidates, heldout_passages, per_depth_best
from hwnas.space import SubnetConfig


def _search(tiny_model, table, out, **kw):
    args = dict(model=str(tiny_model), table=str(table), evaluations=12, population=4, sequences=2, seq_len=32,
                latency_ratio=0.9, out=str(out), progress=False)
    return run_search(**{**args, **kw})


def test_last_word_nll_matches_one_passage_at_a_time(tiny_model):
    sn = Supernet.from_pretrained(tiny_model)
    cfg = sn.search_space.sample(seed=1)
    nll = LastWordNLL(sn, passages=6, batch_size=4)
    assert len({len(s) for s in nll.scorer.seqs}) > 1  # batches really pad
    got = nll(cfg)
    sn.set_active(cfg)
    want = 0.0
    with torch.no_grad():
        for s, n in zip(nll.scorer.seqs, nll.scorer.targets):
            logp = torch.log_softmax(sn(torch.tensor([s])).logits[0].float(), -1)
            want -= sum(float(logp[len(s) - n - 1 + j, s[len(s) - n + j]]) for j in range(n))
    assert got == pytest.approx(want / 6, rel=1e-5)
    assert nll(sn.search_space.max_config()) != pytest.approx(got)


def test_choice_nll_matches_one_question_at_a_time_under_int8_emulation(tiny_model):
    import numpy as np

    from hwnas.elastic import OrtInt8

    sn = Supernet.from_pretrained(tiny_model)
    cfg = sn.search_space.sample(seed=2)
    quant = OrtInt8.from_settings({"reduce_range": False})
    choice = ChoiceNLL(sn, questions=2, quant=quant, batch_size=5)
    assert [q[0] for q in choice.questions] == ["sciq"] * 2 + ["openbookqa"] * 2 + ["social_iqa"] * 2
    got = choice.scores(cfg)
    sn.set_active(cfg, quant=quant)
    nll, acc = [], []
    with torch.no_grad():
        for i, (_, prompt, choices, gold) in enumerate(choice.questions):
            ll = []
            for c in choices:  # the full forward, one sequence at a time: no padding, the LM head everywhere
                p = sn.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                w = sn.tokenizer(" " + c, add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(sn(torch.tensor([p + w])).logits[0].float(), -1)
                ll.append(sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(w)))
            nll.append(float(np.logaddexp.reduce(ll) - ll[gold]))
            acc.append(float(np.argmax(ll) == gold))
    assert got["choice_nll"] == pytest.approx(np.mean(nll), rel=1e-4)
    assert got["choice_acc"] == pytest.approx(np.mean(acc))
    assert choice(cfg) == got["choice_nll"]
    assert choice(sn.search_space.max_config()) != pytest.approx(got["choice_nll"])


def test_task_nll_scores_the_reported_tasks_last_questions_as_their_lm_eval_tasks_prompt_them(tiny_model):
    from hwnas.data import report_limit, task_questions
    from hwnas.lmeval import task_manager

    questions = task_questions(2)
    assert [q[0] for q in questions] == ["arc_easy"] * 2 + ["piqa"] * 2 + ["hellaswag"] * 2
    tasks = task_manager().load(["hwnas_arc_easy", "hwnas_piqa", "hwnas_hellaswag"])["tasks"]
    for k, name in enumerate(["hwnas_arc_easy", "hwnas_piqa", "hwnas_hellaswag"]):
        docs = list(tasks[name].eval_docs)
        for (_, prompt, choices, gold), doc in zip(questions[2 * k:2 * k + 2], docs[-2:]):  # the split's last two
            t = tasks[name]
            assert (prompt, choices, gold) == (t.doc_to_text(doc), t.doc_to_choice(doc), int(t.doc_to_target(doc)))
    with pytest.raises(HwnasError, match="ARC-Easy/validation has 570 questions.*got 570"):
        task_questions(570)
    assert report_limit(150) == 570 - 150  # ARC-Easy's is the smallest of the three splits
    sn = Supernet.from_pretrained(tiny_model)
    cfg = sn.search_space.sample(seed=3)
    got = TaskNLL(sn, 2).scores(cfg)
    choice = ChoiceNLL(sn, 2, source="reported").scores(cfg)
    parts = [choice["arc_easy_nll"], choice["piqa_nll"], choice["hellaswag_nll"], LastWordNLL(sn, 2)(cfg)]
    assert [got[k] for k in ("arc_easy_nll", "piqa_nll", "hellaswag_nll", "lambada_nll")] == pytest.approx(parts)
    assert got["task_nll"] == pytest.approx(sum(parts) / 4) and TaskNLL(sn, 2)(cfg) == pytest.approx(got["task_nll"])


def test_heldout_passages_are_neither_the_start_nor_the_end_of_the_calibration_split():
    from hwnas.data import lambada_items

    items = lambada_items("calibration")
    mid = heldout_passages(10)
    assert mid[0] not in items[:len(items) // 3] and mid[-1] not in items[-len(items) // 3:]
    with pytest.raises(HwnasError, match="selection passages must be in 1.."):
        heldout_passages(0)


def test_per_depth_best_keeps_the_lowest_kl_of_each_depth(tiny_model):
    sp = Supernet.from_pretrained(tiny_model).search_space
    cfgs = [sp.sample(seed=s) for s in range(40)]
    rows = [Evaluated(c, float(i % 7), 1.0, 1.0, 0) for i, c in enumerate(cfgs)]
    got = per_depth_best(rows, k=2)
    depths = {r.config.depth for r in rows}
    assert len(got) == min(2, len(depths)) and len({r.config.depth for r in got}) == len(got)
    for r in got:
        assert r.quality == min(x.quality for x in rows if x.config.depth == r.config.depth)
    others = [min(x.quality for x in rows if x.config.depth == d) for d in depths - {r.config.depth for r in got}]
    assert all(o >= max(r.quality for r in got) for o in others)


def test_baselines_networks_are_candidates_even_where_their_depth_has_a_lower_kl(tiny_model):
    sp = Supernet.from_pretrained(tiny_model).search_space
    full = sp.max_config()
    dropped = SubnetConfig(full.num_layers, full.layers[1:], full.mlp[1:], full.heads[1:], full.kv_heads[1:])
    narrowed = SubnetConfig(full.num_layers, full.layers[1:], (min(sp.mlp_choices),) + full.mlp[2:],
                            full.heads[1:], full.kv_heads[1:])
    baseline = Evaluated(dropped, 1.0, 1.0, 1.0, -1)
    rows = [Evaluated(narrowed, 0.9, 1.0, 1.0, 0), Evaluated(full, 0.5, 1.0, 1.0, 0)]
    # the narrowed network hides the plain one of the same depth; the baseline's is scored all the same
    assert [(r.config, why) for r, why in candidates(rows, 2, [baseline])] == [
        (full, "lowest KL of its depth"), (narrowed, "lowest KL of its depth"), (dropped, "baseline's network")]
    # never twice: a baseline's network that is its depth's lowest KL is a candidate once, for that
    assert [why for _, why in candidates(rows + [baseline], 2, [baseline])] == ["lowest KL of its depth"] * 2 + [
        "baseline's network"]
    assert [why for _, why in candidates([rows[1], baseline], 2, [baseline])] == ["lowest KL of its depth"] * 2


def _layer_drop(sp: Setup) -> SubnetConfig:
    return layer_drop(sp.supernet.search_space, least_influential(sp.supernet.layer_importance),
                      latency=sp.objectives.latency, budget=sp.objectives.latency_budget)


def test_baseline_rows_are_the_layer_drop_and_width_uniform_networks(tiny_model, width_table, pruning_budget):
    sp = setup(model=str(tiny_model), table=str(width_table), latency_budget=pruning_budget, sequences=2, seq_len=32)
    obj, dropped = sp.objectives, _layer_drop(sp)
    uniform, kl, _ = width_uniform(sp.supernet.search_space, sp.encoder.head_options, latency=obj.latency,
                                   budget=obj.latency_budget, quality=obj.quality)
    assert dropped != uniform  # else this test would not see both
    ev = Evaluator(sp.encoder, sp.objectives, budget=10)
    ev.evaluate(sp.encoder.encode(dropped)[None], generation=3)  # the search met layer-drop's, not the other
    rows = baseline_rows(ev, sp)
    assert [r.config for r in rows] == [dropped, uniform]
    assert rows[0] is ev.done[dropped] and ev.used == 1  # taken from the search, outside its budget count
    assert rows[1].generation == -1 and rows[1].quality == pytest.approx(kl)  # evaluated now
    # a budget that only the full model meets: both baselines build it, and it is one candidate
    at_full = dataclasses.replace(sp, objectives=dataclasses.replace(
        sp.objectives, latency_budget=sp.objectives.latency(sp.supernet.search_space.max_config())))
    assert [r.config for r in baseline_rows(Evaluator(sp.encoder, at_full.objectives, budget=1), at_full)] == [
        sp.supernet.search_space.max_config()]
    # a budget neither reaches, and none at all: no candidates, no error
    tight = dataclasses.replace(sp, objectives=dataclasses.replace(sp.objectives, latency_budget=1e-9))
    assert baseline_rows(Evaluator(sp.encoder, tight.objectives, budget=1), tight) == []
    free = dataclasses.replace(sp, objectives=dataclasses.replace(sp.objectives, latency_budget=None))
    assert baseline_rows(Evaluator(sp.encoder, free.objectives, budget=1), free) == []


def test_search_selects_its_winner_by_heldout_nll_and_resumes_the_scores(tiny_model, tiny_tables, run_cli, tmp_path,
                                                                        monkeypatch):
    r = _search(tiny_model, tiny_tables["onnxruntime"], tmp_path / "s", select=3, select_items=4)
    sel = json.loads((tmp_path / "s" / "selection.json").read_text())
    pareto = json.loads((tmp_path / "s" / "pareto.json").read_text())
    cands = sel["candidates"]
    best = [c for c in cands if c["candidate"] == "lowest KL of its depth"]
    assert 1 <= len(best) <= 3 and len({c["layers"] for c in best}) == len(best)
    assert all(c["latency_ratio"] <= 0.9 + 1e-9 for c in cands)
    # layer-drop's network, as `hwnas baseline` builds it, is always scored (both: test_baseline_rows_...)
    sp = setup(model=str(tiny_model), table=str(tiny_tables["onnxruntime"]), latency_ratio=0.9, sequences=2, seq_len=32)
    assert _layer_drop(sp).to_dict() in [c["config"] for c in cands]
    assert sel["chosen"] == min(cands, key=lambda c: c["nll"]) and "SciQ" in sel["settings"]["metric"]
    assert r["best"]["config"] == pareto["selected"]["config"] == sel["chosen"]["config"]
    assert choose(pareto, 0.9)["config"] == sel["chosen"]["config"] and choose(pareto, 0.9)["index"] is None
    # `hwnas export` takes the selected winner by default
    run_cli("export", "--model", str(tiny_model), "--subnet", str(tmp_path / "s" / "pareto.json"),
            "--out", str(tmp_path / "best"))
    assert json.loads((tmp_path / "best" / "hwnas_subnet.json").read_text()) == sel["chosen"]["config"]
    assert SubnetConfig.from_json(tmp_path / "s" / "pareto.json", 0).to_dict() == pareto["front"][0]["config"]
    # a rerun of the search's outputs reuses the saved scores instead of recomputing them
    monkeypatch.setattr(ChoiceNLL, "__call__", lambda self, cfg: pytest.fail("recomputed a saved score"))
    again = _search(tiny_model, tiny_tables["onnxruntime"], tmp_path / "s", select=3, select_items=4, resume=True)
    assert again["best"] == r["best"]
    # the other metric scores again, under its own settings, and says which metric chose
    other = _search(tiny_model, tiny_tables["onnxruntime"], tmp_path / "s", select=3, select_items=4, resume=True,
                    select_metric="lastword-nll")
    sel = json.loads((tmp_path / "s" / "selection.json").read_text())
    assert "LAMBADA" in sel["settings"]["metric"] == other["best"]["selected_by"]
    assert sel["chosen"]["config"] == other["best"]["config"]


def test_search_without_a_budget_or_with_select_0_keeps_the_lowest_kl(tiny_model, tiny_tables, tmp_path):
    r = _search(tiny_model, tiny_tables["onnxruntime"], tmp_path / "a", latency_ratio=None)
    assert not (tmp_path / "a" / "selection.json").exists() and "nll" not in r["best"]
    r = _search(tiny_model, tiny_tables["onnxruntime"], tmp_path / "b", select=0)
    assert not (tmp_path / "b" / "selection.json").exists()
    assert "selected" not in json.loads((tmp_path / "b" / "pareto.json").read_text())
    with pytest.raises(HwnasError, match="select must be >= 0"):
        _search(tiny_model, tiny_tables["onnxruntime"], tmp_path / "c", select=-1)
    with pytest.raises(HwnasError, match="selection metric 'acc' is not known; expected one of"):
        _search(tiny_model, tiny_tables["onnxruntime"], tmp_path / "d", select_metric="acc")
    assert not (tmp_path / "d" / "state.json").exists()  # refused before searching
