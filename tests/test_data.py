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
    from hwnas.data import coqa_calibration_stories, coqa_stories
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
    last = tok(stories[-1], add_special_tokens=False)["input_ids"]
    assert end[1, :16].tolist() == last[:16]  # read from the last story backwards
    reserved = sum(len(ids) + 1 for ids in tok(coqa_calibration_stories(), add_special_tokens=False)["input_ids"])
    with pytest.raises(HwnasError, match="calibration text gives"):  # never reads into the training stories
        calibration_batches(tok, Calibration(2, reserved + 1))
    assert not set(map(tuple, end.tolist())) & set(map(tuple, mixed.tolist()))
    assert Calibration(4, 64).key() != Calibration(4, 64, source="lambada").key() == "lambada-calibration-4x64"
    with pytest.raises(HwnasError, match="calibration source 'web' is not known"):
        Calibration(source="web")


def test_training_corpus_shares_no_text_with_anything_hwnas_calibrates_selects_or_evaluates_on():
    import re

    from hwnas.data import TRAINING_CORPUS, coqa_stories, held_out_texts, sentences, training_texts

    corpus = training_texts()
    assert corpus.name == TRAINING_CORPUS and len(corpus.texts) == len(set(corpus.texts)) > 10_000
    assert sum(map(len, corpus.texts)) > 5_000_000  # about 1.5M tokens
    held = held_out_texts()
    sizes = {k: len(v) for k, v in held.items()}
    assert sizes["lambada"] == 5153 and sizes["coqa"] == 96 and sizes["boolq"] == 3270 and sizes["mmlu"] > 14_000
    assert {"sciq", "openbookqa", "social_iqa", "arc-easy", "arc-challenge", "piqa", "hellaswag", "winogrande"} < set(held)
    # whole passages, then normalized sentences of 8+ words, then any 13-word span
    exact = {t.strip() for v in held.values() for t in v}
    assert not [t for t in corpus.texts if t.strip() in exact]
    assert len(set(corpus.texts) & set(coqa_stories())) > 350  # the stories calibration never reads
    held_sentences = set().union(*(sentences(t) for v in held.values() for t in v))
    assert not [t for t in corpus.texts if sentences(t) & held_sentences]
    word = re.compile(r"[a-z0-9]+")
    spans = set()
    for t in corpus.texts:
        w = word.findall(t.lower())
        spans.update(hash(" ".join(w[i:i + 13])) for i in range(len(w) - 12))
    shared = []
    for name, texts in held.items():
        for t in texts:
            w = word.findall(t.lower())
            if any(hash(" ".join(w[i:i + 13])) in spans for i in range(len(w) - 12)):
                shared.append((name, t[:80]))
    assert not shared, shared[:5]


def test_training_text_files_and_packing(tiny_model, tmp_path):
    import pytest
    import torch
    from transformers import AutoTokenizer

    from hwnas import HwnasError
    from hwnas.data import pack_tokens, training_texts

    (tmp_path / "t.txt").write_text("The capital of France is Paris.\n\n\n  She smiled.  \n\nThe capital of France is Paris.\n")
    text = training_texts(tmp_path / "t.txt")
    assert text.texts == ("The capital of France is Paris.", "She smiled.") and text.name == "file:t.txt"
    with pytest.raises(HwnasError, match="not found"):
        training_texts(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(HwnasError, match="is empty"):
        training_texts(tmp_path / "blank.txt")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = [f"The capital of France is Paris, page {i}." for i in range(40)]
    rows = pack_tokens(tok, texts, 16)
    flat = sum((tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts), [])
    assert rows.shape == (len(flat) // 16, 16) and rows.flatten().tolist() == flat[:rows.numel()]
    assert torch.equal(pack_tokens(tok, texts, 16, rows=3), rows[:3])
    shuffled = pack_tokens(tok, texts, 16, seed=1)
    assert torch.equal(shuffled, pack_tokens(tok, texts, 16, seed=1)) and not torch.equal(shuffled, rows)
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, rows.tolist()))
    with pytest.raises(HwnasError, match="less than one sequence"):
        pack_tokens(tok, ["Paris."], 64)
