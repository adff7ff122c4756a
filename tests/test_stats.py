"""Second-moment statistics: correctness against a direct computation, and the cache."""

from __future__ import annotations

import torch

from factedit.arch import describe
from factedit.corpus import Corpus
from factedit.hooks import Trace
from factedit.stats import compute_second_moment, layer_stats, layers_stats, packed_token_rows

TEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
    "The Beatles were an English rock band formed in Liverpool in 1960.",
    "Mount Everest is Earth's highest mountain above sea level, in the Himalayas.",
    "Python is a high-level, general-purpose programming language.",
] * 6


def test_second_moment_matches_direct_computation(model, tok):
    corpus = Corpus.from_texts(TEXTS, name="tiny")
    layer = 3
    mom2, mean, count = compute_second_moment(
        model, tok, layer, corpus=corpus, tokens=400, seq_len=64, progress=False
    )
    rows = packed_token_rows(tok, corpus, 400, 64)
    arch = describe(model)
    keys = []
    with torch.no_grad():
        for row in rows:
            ids = row[row >= 0][None]
            with Trace(
                model, arch.mlp_out_name(layer), retain_input=True, retain_output=False, stop=True
            ) as tr:
                model(input_ids=ids)
            keys.append(tr.input[0].double())
    k = torch.cat(keys)
    assert count == k.shape[0] == int((rows >= 0).sum())
    torch.testing.assert_close(mom2, k.T @ k / count, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mean, k.mean(0), rtol=1e-4, atol=1e-6)
    # A second moment is symmetric positive semi-definite.
    assert torch.equal(mom2, mom2.T) or torch.allclose(mom2, mom2.T, atol=1e-9)
    assert torch.linalg.eigvalsh(mom2).min() > -1e-6


def test_cache_returns_identical_statistics(model, tok, tmp_path):
    corpus = Corpus.from_texts(TEXTS, name="tiny")
    kw = dict(corpus=corpus, tokens=300, seq_len=64, cache_dir=tmp_path, progress=False)
    first = layer_stats(model, tok, 2, **kw)
    assert not first.from_cache
    assert list(tmp_path.glob("*.safetensors"))
    second = layer_stats(model, tok, 2, **kw)
    assert second.from_cache and second.key == first.key
    assert torch.equal(first.mom2, second.mom2) and second.count == first.count
    # Anything the value depends on changes the key.
    other_budget = layer_stats(model, tok, 2, **{**kw, "tokens": 200})
    assert other_budget.key != first.key and not other_budget.from_cache
    other_corpus = layer_stats(
        model, tok, 2, **{**kw, "corpus": Corpus.from_texts(TEXTS[:2] * 8, name="tiny")}
    )
    assert other_corpus.key != first.key


def test_several_layers_in_one_pass_are_each_layers_statistics_cached_per_layer(
    model, tok, tmp_path
):
    corpus = Corpus.from_texts(TEXTS, name="tiny")
    kw = dict(corpus=corpus, tokens=300, seq_len=64, progress=False)
    # One layer cached first: the pass computes only the missing ones and reads that one.
    alone = layer_stats(model, tok, 4, cache_dir=tmp_path / "a", **kw)
    got = layers_stats(model, tok, [2, 4, 6], cache_dir=tmp_path / "a", **kw)
    assert sorted(got) == [2, 4, 6] and got[4].from_cache and torch.equal(got[4].mom2, alone.mom2)
    for i in (2, 6):
        own = layer_stats(model, tok, i, cache_dir=tmp_path / "b", **kw)
        assert not own.from_cache and got[i].key == own.key and got[i].count == own.count
        torch.testing.assert_close(got[i].mom2, own.mom2, rtol=1e-5, atol=1e-7)
        # Cached under layer_stats' own key: a later single-layer call reads it.
        assert layer_stats(model, tok, i, cache_dir=tmp_path / "a", **kw).from_cache


def test_cache_key_follows_the_weights_that_feed_the_layer(model, tok, tmp_path, unchanged_after):
    corpus = Corpus.from_texts(TEXTS, name="tiny")
    kw = dict(corpus=corpus, tokens=200, seq_len=64, cache_dir=tmp_path, progress=False)
    arch = describe(model)
    base = layer_stats(model, tok, 2, **kw).key
    proj = model.get_submodule(arch.mlp_out_name(2)).weight
    lower = model.get_submodule(arch.mlp_out_name(1)).weight
    with torch.no_grad():
        saved = proj.clone()
        proj.add_(1.0)  # the edited projection itself does not feed its own inputs
        assert layer_stats(model, tok, 2, **kw).key == base
        proj.copy_(saved)
        saved = lower.clone()
        lower.add_(1e-3)  # a lower layer does
        assert layer_stats(model, tok, 2, **kw).key != base
        lower.copy_(saved)


def test_stats_on_tiny_architectures(tiny_model, tok):
    corpus = Corpus.from_texts(TEXTS, name="tiny")
    arch = describe(tiny_model)
    mom2, _, count = compute_second_moment(
        tiny_model, tok, 1, corpus=corpus, tokens=128, seq_len=32, progress=False
    )
    assert mom2.shape == (arch.mlp_size, arch.mlp_size) and count > 0
    assert torch.isfinite(mom2).all()
