from hwnas.data import SPLITS, lambada_items, lambada_texts


def test_lambada_splits_are_disjoint_and_complete():
    parts = {s: lambada_items(s) for s in SPLITS}
    assert sum(len(p) for p in parts.values()) == 5153
    contexts = [set(c for c, _ in p) for p in parts.values()]
    assert not (contexts[0] & contexts[1]) and not (contexts[0] & contexts[2]) and not (contexts[1] & contexts[2])
    assert 1200 < len(parts["calibration"]) < 1400


def test_texts_are_whole_passages_in_a_stable_order():
    ctx, word = lambada_items("validation")[0]
    assert lambada_texts("validation", 1) == [ctx + word]
    assert lambada_texts("calibration", 5) == lambada_texts("calibration")[:5]


def test_calibration_text_mixes_books_and_coqa_by_sequence_and_reads_the_ends_apart(tiny_model):
    import pytest
    import torch
    from transformers import AutoTokenizer

    from hwnas import HwnasError
    from hwnas.data import coqa_stories
    from hwnas.supernet import Calibration, calibration_batches

    stories = coqa_stories()
    assert len(stories) == 499 and len(set(stories)) == 499
    tok = AutoTokenizer.from_pretrained(tiny_model)
    books = calibration_batches(tok, Calibration(2, 64, source="lambada"))
    mixed = calibration_batches(tok, Calibration(4, 64))
    assert mixed.shape == (4, 64) and Calibration().source == "mixed"
    assert torch.equal(mixed[0], books[0]) and torch.equal(mixed[2], books[1])  # LAMBADA's sequences, in turn
    coqa = tok("".join(stories[:3]), add_special_tokens=False)["input_ids"]
    assert mixed[1, :16].tolist() == coqa[:16]  # CoQA's first story starts the other sequences
    end = calibration_batches(tok, Calibration(4, 64), from_end=True)
    assert not set(map(tuple, end.tolist())) & set(map(tuple, mixed.tolist()))
    assert Calibration(4, 64).key() != Calibration(4, 64, source="lambada").key() == "lambada-calibration-4x64"
    with pytest.raises(HwnasError, match="calibration source 'web' is not known"):
        Calibration(source="web")
