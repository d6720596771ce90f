"""`hwnas run --heal-candidates`: the selection's best candidates healed briefly and re-scored."""
from __future__ import annotations

import json

import pytest

from hwnas.common import HwnasError


@pytest.fixture(scope="module")
def tiny_search(tiny_model, tiny_tables, tmp_path_factory):
    from hwnas.search import run_search

    out = tmp_path_factory.mktemp("search") / "search"
    run_search(model=str(tiny_model), table=str(tiny_tables["onnxruntime"]), evaluations=12, population=4,
               latency_ratio=0.8, select=3, select_items=4, out=str(out), progress=False)
    return out


def test_candidates_are_healed_rescored_and_the_best_after_healing_wins(tiny_model, tiny_search, tmp_path):
    from hwnas.heal_select import RESULT, pick_after_healing

    selection = json.loads((tiny_search / "selection.json").read_text())
    if len(selection["candidates"]) < 2:
        pytest.skip("the tiny search left a single candidate")
    r = pick_after_healing(source=str(tiny_model), search_dir=tiny_search, k=2, tokens=2048, work=tmp_path,
                           progress=False)
    best_two = sorted(selection["candidates"], key=lambda c: c["nll"])[:2]
    assert [c["key"] for c in r["candidates"]] == [c["key"] for c in best_two]
    assert all(c["nll_after_healing"] > 0 and c["nll_before_healing"] == c["nll"] for c in r["candidates"])
    assert r["chosen"] == min(r["candidates"], key=lambda c: c["nll_after_healing"])
    assert r["changed_pick"] == (r["chosen"]["key"] != best_two[0]["key"])
    for i in range(2):  # each candidate exported in the search's channel order and healed on 2048 tokens
        heal = json.loads((tmp_path / f"candidate-{i}" / "healed" / "hwnas_heal.json").read_text())
        assert heal["tokens"] == 2048
        sub = json.loads((tmp_path / f"candidate-{i}" / "subnet" / "hwnas_subnet.json").read_text())
        assert sub == best_two[i]["config"]
    before = (tmp_path / RESULT).stat().st_mtime_ns
    again = pick_after_healing(source=str(tiny_model), search_dir=tiny_search, k=2, tokens=2048, work=tmp_path,
                               progress=False)  # resumes: nothing healed or scored twice
    assert again["chosen"] == r["chosen"]
    assert all((tmp_path / f"candidate-{i}" / "healed" / "hwnas_heal.json").stat().st_mtime_ns < before for i in range(2))


def test_one_candidate_or_no_selection_is_refused(tiny_model, tmp_path):
    from hwnas.heal_select import pick_after_healing

    with pytest.raises(HwnasError, match="at least 2"):
        pick_after_healing(source=str(tiny_model), search_dir=tmp_path, k=1, tokens=2048, work=tmp_path / "w")
    with pytest.raises(HwnasError, match="no selection.json"):
        pick_after_healing(source=str(tiny_model), search_dir=tmp_path, k=2, tokens=2048, work=tmp_path / "w")
