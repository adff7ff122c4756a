"""Metric arithmetic against hand-computed values (no model needed: the metrics are pure)."""

from __future__ import annotations

import math

import pytest

from factedit.evaluate.metrics import (
    PromptSetScores,
    argmax_agreement,
    bootstrap_harmonic_ci,
    counterfact_metrics,
    generation_entropy,
    harmonic_mean,
    mean_ci,
    ngram_entropy,
    paired_changes,
    paired_difference,
    prob_margin,
    relative_change,
    success_rate,
    summarize_cases,
    words,
    zsre_metrics,
)
from factedit.evaluate.tfidf import (
    ReferenceIndex,
    ReferenceScorer,
    TfidfModel,
    load_reference_scorer,
)

LN = math.log


def test_success_and_margin_use_mean_token_probabilities():
    # Prompt 1: P(new)=0.5 > P(true)=0.25; prompt 2: 0.1 < 0.2; prompt 3: tie -> not a success.
    new = [LN(0.5), LN(0.1), LN(0.3)]
    true = [LN(0.25), LN(0.2), LN(0.3)]
    assert success_rate(new, true) == pytest.approx(1 / 3)
    assert prob_margin(new, true) == pytest.approx((0.25 - 0.1 + 0.0) / 3)
    with pytest.raises(ValueError):
        success_rate([0.0], [0.0, 1.0])


def test_counterfact_case_metrics_by_hand():
    rewrite = PromptSetScores((LN(0.6),), (LN(0.2),), new_acc=(1.0,), true_acc=(0.0,))
    para = PromptSetScores(
        (LN(0.3), LN(0.1)), (LN(0.2), LN(0.4)), new_acc=(0.5, 0.0), true_acc=(0.0, 1.0)
    )
    neigh = PromptSetScores(
        (LN(0.1), LN(0.5)), (LN(0.7), LN(0.2)), new_acc=(0.0, 1.0), true_acc=(1.0, 0.0),
        true_argmax=((5, 6), (7,)),
    )  # fmt: skip
    pre_neigh = PromptSetScores((0.0, 0.0), (0.0, 0.0), true_argmax=((5, 9), (7,)))
    m = counterfact_metrics(rewrite, para, neigh, pre_neighborhood=pre_neigh)
    assert m["ES"] == 1.0 and m["EM"] == pytest.approx(0.4)
    assert m["PS"] == 0.5 and m["PM"] == pytest.approx((0.1 - 0.3) / 2)
    # Neighbourhood: the TRUE answer must win: 0.7 > 0.1 yes, 0.2 > 0.5 no.
    assert m["NS"] == 0.5 and m["NM"] == pytest.approx((0.6 - 0.3) / 2)
    assert m["ES-acc"] == 1.0 and m["PS-acc"] == 0.25 and m["NS-acc"] == 0.5
    # Agreement: prompt 1 agrees on 1 of 2 tokens, prompt 2 on 1 of 1 -> mean 0.75.
    assert m["NS-agree"] == pytest.approx(0.75)
    assert "NS-agree" not in counterfact_metrics(rewrite, para, neigh)


def test_zsre_metrics_by_hand():
    q = PromptSetScores((LN(0.5),), (LN(0.1),), new_acc=(2 / 3,), true_acc=(0.0,))
    r = PromptSetScores((LN(0.5),), (LN(0.1),), new_acc=(0.0,), true_acc=(0.0,))
    loc = PromptSetScores((), (LN(0.9),), true_acc=(0.5,), true_argmax=((1, 2, 3, 4),))
    pre_loc = PromptSetScores((), (LN(0.9),), true_acc=(0.5,), true_argmax=((1, 2, 0, 4),))
    m = zsre_metrics(q, r, loc, pre_locality=pre_loc)
    assert m == pytest.approx(
        {"Efficacy": 2 / 3, "Paraphrase": 0.0, "NQ-acc": 0.5, "Specificity": 0.75}
    )
    with pytest.raises(ValueError):
        argmax_agreement([(1, 2)], [(1,)])


def test_harmonic_mean():
    assert harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert harmonic_mean([0.9, 0.0, 1.0]) == 0.0
    assert math.isnan(harmonic_mean([0.5, float("nan")]))


def test_ngram_entropy_matches_rome_definition():
    # "a b a b": bigrams ab, ba, ab -> f = (2/3, 1/3); trigrams aba, bab -> (1/2, 1/2).
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    expected = ((2 / 3) * h2 + (4 / 3) * h3) / 2
    assert ngram_entropy("a b a b") == pytest.approx(expected)
    # Repetition lowers entropy: a degenerate generation scores below a varied one.
    assert ngram_entropy("the the the the the the") == 0.0
    assert generation_entropy(["a b a b", "the the the the"]) == pytest.approx(expected / 2)
    assert words("Paris, France's capital.") == ["Paris", ",", "France's", "capital", "."]


def test_mean_ci_and_summary():
    est = mean_ci([1.0, 0.0, 1.0, 0.0])
    sd = math.sqrt(1 / 3)  # sample std (ddof=1) of 1,0,1,0
    assert est.mean == 0.5 and est.n == 4
    assert est.ci95 == pytest.approx(1.96 * sd / 2)
    assert math.isnan(mean_ci([0.3]).ci95) and mean_ci([]).n == 0
    rows = [{"ES": 1.0, "PS": 0.5, "NS": 1.0}, {"ES": 1.0, "PS": 1.0, "NS": 0.5, "GE": 5.0}]
    s = summarize_cases(rows, ["Score", "ES", "PS", "NS", "GE"])
    assert list(s) == ["Score", "ES", "PS", "NS", "GE"]
    assert s["Score"].mean == pytest.approx(harmonic_mean([1.0, 0.75, 0.75]))
    assert s["GE"].n == 1
    boot = bootstrap_harmonic_ci([[1.0, 1.0, 0.0, 1.0], [1.0, 0.5, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    assert boot.ci95 > 0 and boot.n == 4


def test_paired_change_by_hand():
    # Differences -0.1 and -0.3: mean -0.2, sample sd sqrt(0.02), half-width 1.96 * 0.1.
    d = paired_difference([6.0, 6.0, None], [5.9, 5.7, 4.0])
    assert (d.mean, d.n) == (pytest.approx(-0.2), 2) and d.ci95 == pytest.approx(0.196)
    # Pairing removes what cases share: two cases far apart that both lose 0.2 exactly have an
    # unpaired CI far wider than the change, and a paired one of 0.
    far = paired_difference([2.0, 8.0], [1.8, 7.8])
    assert far.mean == pytest.approx(-0.2) and far.ci95 == pytest.approx(0.0, abs=1e-12)
    assert mean_ci([1.8, 7.8]).ci95 > 5
    rel = relative_change([6.0, 6.0, float("nan")], [5.9, 5.7, 1.0])  # NaN pairs are skipped
    assert rel.mean == pytest.approx(-0.2 / 6) and rel.ci95 == pytest.approx(0.196 / 6)
    assert math.isnan(relative_change([0.0, 0.0], [1.0, 1.0]).mean)
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([1.0], [1.0, 2.0])
    pre = [{"ES": 0.0, "GE": 6.0, "Score": 0.1}, {"ES": 1.0}]
    post = [{"ES": 1.0, "GE": 5.4}, {"ES": 1.0}]
    ch = paired_changes(pre, post)
    assert set(ch) == {"ES", "GE"}  # Score has no per-case value
    assert ch["ES"].mean == pytest.approx(0.5) and ch["ES"].n == 2
    assert ch["GE"].mean == pytest.approx(-0.6) and ch["GE"].n == 1


def test_tfidf_by_hand(tmp_path):
    docs = ["paris france capital", "berlin germany capital", "paris city lights"]
    model = TfidfModel.fit(docs, identity="toy")
    # df(paris)=2, df(capital)=2, df(france)=1 of N=3: idf = ln(4/(1+df)) + 1.
    assert model.idf["paris"] == pytest.approx(LN(4 / 3) + 1)
    assert model.idf["france"] == pytest.approx(LN(4 / 2) + 1)
    # "the" is a stop word; the vector of "paris paris france" is L2-normalised counts * idf.
    v = model.vector("the paris paris france")
    a, b = 2 * (LN(4 / 3) + 1), LN(2) + 1
    assert v == pytest.approx({"paris": a / math.hypot(a, b), "france": b / math.hypot(a, b)})
    assert model.similarity("paris", "paris") == pytest.approx(1.0)
    assert model.similarity("paris", "berlin") == 0.0
    model.save(tmp_path / "toy.json")
    assert TfidfModel.load(tmp_path / "toy.json", "toy") == model
    assert TfidfModel.load(tmp_path / "toy.json", "other") is None

    index = ReferenceIndex([("Paris", "Capital of France."), ("Seine", "A river through Paris."),
                            ("Parisian", "Parisians live here.")])  # fmt: skip
    assert index.texts_for("paris") == ["Capital of France.", "A river through Paris."]
    scorer = ReferenceScorer(model, index)
    assert scorer.reference_score(["I love Paris"], "Atlantis") is None
    assert scorer.reference_score(["france capital"], "Paris") > scorer.reference_score(
        ["germany"], "Paris"
    )


def test_reference_scorer_caches_statistics_on_disk(tmp_path):
    articles = [
        ("Paris", "Paris is the capital of France."),
        ("Rome", "Rome is the capital of Italy."),
    ]
    first = load_reference_scorer(articles, cache=tmp_path)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    again = load_reference_scorer(articles, cache=tmp_path)
    assert again.model == first.model
    other = load_reference_scorer([("Oslo", "Oslo is in Norway.")], cache=tmp_path)
    assert other.model.identity != first.model.identity and len(list(tmp_path.glob("*.json"))) == 2


def test_estimate_formatting_and_json():
    from factedit.evaluate.metrics import Estimate

    assert Estimate(0.5, 0.1, 10).format(100.0, 1) == "50.0 ± 10.0"
    assert Estimate(-0.0001, 0.002, 10).format(100.0, 1) == "0.0 ± 0.2"
    assert Estimate(0.25, float("nan"), 1).format(100.0, 1) == "25.0"
    assert Estimate(float("nan"), float("nan"), 0).format() == "-"
    assert Estimate(0.25, float("nan"), 1).to_dict() == {"mean": 0.25, "ci95": None, "n": 1}
