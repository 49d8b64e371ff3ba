"""Bootstrap intervals and paired comparisons: verdicts come from intervals, not from signs."""

from __future__ import annotations

import pytest

from blsp.evaluation import metrics, scoring, stats
from blsp.evaluation.tasks import Task


def test_verdict_is_unresolved_when_the_interval_straddles_zero():
    assert stats.verdict([0.5, 2.0]) == stats.HOLDS
    assert stats.verdict([-2.0, -0.5]) == stats.FAILS
    assert stats.verdict([-0.1, 2.0]) == stats.UNRESOLVED
    assert stats.verdict([-2.0, -0.5], "negative") == stats.HOLDS
    assert stats.verdict([-0.5, 0.1], "negative") == stats.UNRESOLVED
    assert stats.verdict(None) is None


def test_a_small_difference_on_few_items_is_not_resolved_and_a_large_one_on_many_is():
    # 12 items, one more correct answer out of 12: the sign says "better", the interval does not
    a = {f"i{k}": (float(k < 7), 1.0) for k in range(12)}
    b = {f"i{k}": (float(k < 6), 1.0) for k in range(12)}
    few = stats.paired_difference(a, b, scale=100.0)
    assert few["diff"] == pytest.approx(100 / 12) and few["diff"] > 0
    assert stats.verdict(few["ci"]) == stats.UNRESOLVED and few["p"] > 0.05
    # 200 items, 60 more correct: resolved
    a = {f"i{k}": (float(k < 160), 1.0) for k in range(200)}
    b = {f"i{k}": (float(k < 100), 1.0) for k in range(200)}
    many = stats.paired_difference(a, b, scale=100.0)
    assert stats.verdict(many["ci"]) == stats.HOLDS and many["p"] < 0.01
    assert stats.verdict(stats.paired_difference(b, a, scale=100.0)["ci"]) == stats.FAILS


def test_paired_difference_uses_only_shared_items_and_identical_systems_differ_by_zero():
    a = {"x": (3.0, 10.0), "y": (1.0, 5.0), "z": (9.0, 9.0)}
    d = stats.paired_difference(a, {"x": (3.0, 10.0), "y": (1.0, 5.0)})
    assert d["n"] == 2 and d["diff"] == 0.0 and d["ci"] == [0.0, 0.0]
    assert stats.paired_difference(a, {})["diff"] is None


def test_paired_ratio_is_the_ratio_of_the_two_corpus_values_on_shared_items():
    # system a makes twice system b's errors on every shared item: the ratio is 2 on every resample
    b = {f"i{k}": (float(1 + k % 3), 10.0) for k in range(40)}
    a = {k: (2 * e, n) for k, (e, n) in b.items()} | {"only-a": (9.0, 1.0)}
    r = stats.paired_ratio(a, b)
    assert r["n"] == 40 and r["ratio"] == pytest.approx(2.0) and r["ci"] == pytest.approx([2.0, 2.0])
    # errors that do not scale together: the interval holds the corpus ratio and has a width
    c = {f"i{k}": (float(k % 5), 10.0) for k in range(40)}
    r = stats.paired_ratio(c, b)
    point = sum(e for e, _ in c.values()) / sum(e for e, _ in b.values())
    assert r["ratio"] == pytest.approx(point) and r["ci"][0] < point < r["ci"][1]
    assert stats.paired_ratio(a, {})["ratio"] is None
    no_errors = {k: (0.0, n) for k, (_, n) in b.items()}
    assert stats.paired_ratio(a, no_errors)["ratio"] is None


def test_ratio_interval_contains_the_corpus_value_and_narrows_with_more_items():
    pairs = [(float(k % 3), 4.0) for k in range(30)]
    lo, hi = stats.ratio_ci(pairs, 100.0)
    point = 100.0 * sum(p[0] for p in pairs) / sum(p[1] for p in pairs)
    assert lo < point < hi
    lo2, hi2 = stats.ratio_ci(pairs * 10, 100.0)
    assert hi2 - lo2 < (hi - lo) / 2
    assert stats.ratio_ci([]) is None


def test_item_errors_add_up_to_the_corpus_wer():
    refs = ["the cat sat on the mat", "hello world", "", "one two three four"]
    hyps = ["the cat sat on mat", "hello there world", "noise", ""]
    items = metrics.item_errors(refs, hyps)
    assert items[2] is None  # an empty reference is skipped, as error_rate skips it
    er = metrics.error_rate(refs, hyps)
    errors = sum(e for e, _ in filter(None, items))
    units = sum(u for _, u in filter(None, items))
    assert units == er["ref_units"] and 100.0 * errors / units == pytest.approx(er["score"])


def test_scores_carry_intervals_around_their_values():
    task = Task("asr", "asr", "repeat", testset="t")
    rows = [
        {"id": str(k), "ok": True, "response": "a b c" if k % 2 else "a x", "reference": "a b c"}
        for k in range(20)
    ]
    res = scoring.score(task, rows)
    lo, hi = res["ci"]["wer"]
    assert lo <= res["wer"] <= hi and lo < hi
    pairs = scoring.item_pairs(task, rows, "wer")
    assert len(pairs) == 20 and pairs["0"] == (2.0, 3.0)  # one substitution, one deletion of 3 words


def test_paired_comparison_reads_a_runs_outputs_for_a_difference_and_a_ratio(tmp_path):
    import json

    from blsp.evaluation.runner import paired_comparison

    refs = ["the cat sat on the mat", "hello world", "red green blue black"]
    hyps = {
        "a": ["the cat sat on mat", "hello there world", "red green glue block"],  # 1 + 1 + 2 errors
        "b": ["the cat sat on the mat", "hello world", "red green blue"],  # 1 error
    }
    results = {"tasks": [{"key": "asr@x", "name": "asr", "kind": "asr", "target_lang": "en"}], "results": {}}
    for system, texts in hyps.items():
        (tmp_path / system).mkdir()
        rows = [
            {"id": f"u{i}", "ok": True, "response": h, "reference": r}
            for i, (r, h) in enumerate(zip(refs, texts, strict=True))
        ]
        (tmp_path / system / "asr.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
        results["results"][system] = {"asr@x": {"outputs": f"{system}/asr.jsonl"}}
    ratio = paired_comparison(tmp_path, results, "asr@x", "a", "b", "wer", kind="ratio")
    assert ratio["n"] == 3 and ratio["ratio"] == pytest.approx(4.0)
    diff = paired_comparison(tmp_path, results, "asr@x", "a", "b", "wer")
    assert diff["diff"] == pytest.approx(100 * 3 / 12)
    assert paired_comparison(tmp_path, results, "asr@x", "a", "missing", "wer", kind="ratio")["ratio"] is None
