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
