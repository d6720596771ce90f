import json

import pytest
import torch
import torch.nn.functional as F

from hwnas import HwnasError
from hwnas import distill
from hwnas.distill import TrainConfig, batch_rows, kd_loss, lr_at, train


pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(s, t, T, labels=None, hard=0.0):
    v = s.shape[-1]
    kl = F.kl_div(F.log_softmax(s / T, -1).reshape(-1, v), F.log_softmax(t / T, -1).reshape(-1, v), log_target=True,
                  reduction="batchmean") * T * T
    if hard:
        kl = kl + hard * F.cross_entropy(s.reshape(-1, v), labels.reshape(-1), ignore_index=-100)
    return kl


def test_kd_loss_is_zero_for_identical_logits():
    t = torch.randn(2, 7, 40)
    assert float(kd_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(t, t, temperature=3.0)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("T,hard", [(1.0, 0.0), (2.0, 0.0), (1.0, 0.5), (1.5, 0.3)])
def test_kd_loss_and_its_gradient_match_a_direct_kl_chunk_by_chunk(monkeypatch, T, hard):
    monkeypatch.setattr(distill, "CHUNK_ELEMENTS", 40 * 3)  # 3 tokens per chunk: 15 tokens take 5 chunks
    torch.manual_seed(0)
    s = torch.randn(3, 5, 40, requires_grad=True)
    t = torch.randn(3, 5, 40)
    labels = torch.randint(0, 40, (3, 5))
    labels[:, -1] = -100
    s_ref = s.detach().clone().requires_grad_()
    ref = _reference(s_ref, t, T, labels, hard)
    ref.backward()
    got = kd_loss(s, t, temperature=T, labels=labels if hard else None, hard_weight=hard)
    (2 * got).backward()
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    torch.testing.assert_close(s.grad / 2, s_ref.grad, rtol=1e-4, atol=1e-7)


def test_kd_loss_refuses_mismatched_shapes():
    with pytest.raises(HwnasError, match="differ in shape"):
        kd_loss(torch.zeros(2, 5), torch.zeros(2, 6))


def test_config_validates_and_names_its_differences():
    with pytest.raises(HwnasError, match="below one batch"):
        TrainConfig(tokens=100, seq_len=64, batch_size=2)
    with pytest.raises(HwnasError, match="micro_batch 3 does not divide batch_size 8"):
        TrainConfig(tokens=10_000, micro_batch=3)
    cfg = TrainConfig(tokens=5000, seq_len=64, batch_size=8, micro_batch=4, lr=2e-4)
    assert cfg.steps == 9 and cfg.tokens_per_step == 512
    saved = {**cfg.to_dict(), "lr": 1e-4}
    assert cfg.differences(saved) == ["lr was 0.0001, now 0.0002"]
    assert cfg.differences(cfg.to_dict()) == []


def test_learning_rate_warms_up_then_follows_a_cosine_to_its_floor():
    cfg = TrainConfig(tokens=512 * 20, seq_len=64, batch_size=8, lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s) for s in range(cfg.steps)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_batches_cover_every_row_once_per_epoch_in_a_seeded_order():
    rows = torch.cat([batch_rows(s, 10, 5, seed=3) for s in range(4)])
    assert sorted(rows[:10].tolist()) == list(range(10)) and sorted(rows[10:].tolist()) == list(range(10))
    assert torch.equal(batch_rows(1, 10, 5, seed=3), rows[5:10])
    assert not torch.equal(batch_rows(0, 10, 5, seed=4), rows[:5])


# ------------------------------------------------------------------------------ the training loop
@pytest.fixture(scope="module")
def pair(tiny_model):
    from hwnas.loading import load_model

    teacher, _ = load_model(tiny_model)
    teacher.requires_grad_(False)
    return teacher


def _student(tiny_model):
    from hwnas.loading import load_model

    student, _ = load_model(tiny_model)
    student.model.layers = student.model.layers[:2]
    student.config.num_hidden_layers = 2
    return student


def _run(tiny_model, teacher, out, *, fail_at=None, resume=False, **cfg_kw):
    student = _student(tiny_model)
    calls = {"n": 0}

    def loss_fn(batch):
        calls["n"] += 1
        if fail_at is not None and calls["n"] == fail_at:
            raise KeyboardInterrupt  # a kill in the middle of a step
        with torch.no_grad():
            t = teacher(input_ids=batch, use_cache=False).logits
        noise = torch.randn(()) * 1e-3  # a loss that draws random numbers must draw the same after a resume
        return kd_loss(student(input_ids=batch, use_cache=False).logits, t) * (1 + noise)

    rows = torch.randint(0, 300, (12, 16), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(**{**dict(tokens=8 * 4 * 16, seq_len=16, batch_size=4, micro_batch=2, lr=1e-3,
                                warmup_steps=1, checkpoint_every=2, bf16=False), **cfg_kw})
    result = train(student, loss_fn, rows, cfg, out=out, resume=resume, progress=False, extra={"text": "t"})
    return student, result


def test_a_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tiny_model, pair, tmp_path):
    whole, full = _run(tiny_model, pair, tmp_path / "a")
    assert full["complete"] and full["steps"] == 8 and full["tokens"] == 8 * 64
    assert full["history"][-1]["loss"] < full["history"][0]["loss"]
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model, pair, tmp_path / "b", fail_at=2 * 5 + 1)  # killed in step 6, after the checkpoint at 4
    assert json.loads((tmp_path / "b" / "train_state.json").read_text())["step"] == 4
    resumed, result = _run(tiny_model, pair, tmp_path / "b", resume=True)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["loss"] for h in result["history"]] == [h["loss"] for h in full["history"]]
    saved = json.loads((tmp_path / "b" / "train_history.json").read_text())
    assert saved["steps"] == 8 and len(saved["history"]) == 8


def test_resuming_with_other_arguments_is_refused_by_name(tiny_model, pair, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model, pair, tmp_path / "c", fail_at=5)
    with pytest.raises(HwnasError, match=r"lr was 0\.001, now 0\.002"):
        _run(tiny_model, pair, tmp_path / "c", resume=True, lr=2e-3)
    with pytest.raises(HwnasError, match="holds a training checkpoint .*--resume"):
        _run(tiny_model, pair, tmp_path / "c")


def test_the_time_limit_stops_at_a_checkpoint(tiny_model, pair, tmp_path):
    student = _student(tiny_model)

    def loss_fn(batch):
        with torch.no_grad():
            t = pair(input_ids=batch, use_cache=False).logits
        return kd_loss(student(input_ids=batch, use_cache=False).logits, t)

    rows = torch.randint(0, 300, (12, 16), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(tokens=8 * 64, seq_len=16, batch_size=4, micro_batch=4, checkpoint_every=100, bf16=False)
    result = train(student, loss_fn, rows, cfg, out=tmp_path, progress=False, minutes=1e-6)
    assert result["steps"] == 1 and not result["complete"] and result["stopped"].startswith("time limit")
    assert json.loads((tmp_path / "train_state.json").read_text())["step"] == 1
