"""Batched generation and the logit lens, on the real default model."""

from __future__ import annotations

import torch

from factedit.arch import describe
from factedit.generation import (
    GenerationGroup,
    end_token_ids,
    format_lens,
    generate,
    generate_full_length,
    generate_full_length_groups,
    logit_lens,
)

EIFFEL = "The Eiffel Tower is located in the city of"


def test_greedy_knows_paris(model, tok):
    (text,) = generate(model, tok, [EIFFEL], max_new_tokens=4)
    assert text.startswith(EIFFEL)
    assert text[len(EIFFEL) :].startswith(" Paris")


def test_single_prompt_and_empty_batch(model, tok):
    assert generate(model, tok, EIFFEL, max_new_tokens=2) == generate(
        model, tok, [EIFFEL], max_new_tokens=2
    )
    assert generate(model, tok, [], max_new_tokens=2) == []


def test_batched_equals_one_by_one(model, tok):
    prompts = [
        EIFFEL,
        "The Beatles were a band from",
        "The capital of Japan is",  # prompts of different lengths: left padding matters
    ]
    batched = generate(model, tok, prompts, max_new_tokens=8)
    single = [generate(model, tok, p, max_new_tokens=8)[0] for p in prompts]
    assert batched == single
    assert [b.startswith(p) for b, p in zip(batched, prompts, strict=True)] == [True] * 3


def test_seeded_top_k_is_reproducible_and_leaves_global_rng(model, tok):
    prompts = ["My favourite food is"] * 3
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    a = generate(model, tok, prompts, max_new_tokens=8, top_k=40, seed=7)
    assert torch.equal(torch.get_rng_state(), before), "seeded sampling changed the global RNG"
    assert a == generate(model, tok, prompts, max_new_tokens=8, top_k=40, seed=7)
    # It really samples: rows of one batch differ, and another seed gives other texts.
    assert len(set(a)) > 1
    assert a != generate(model, tok, prompts, max_new_tokens=8, top_k=40, seed=8)


def test_full_length_generation_goes_past_end_of_sequence(model, tok):
    # Make a common word the end-of-sequence token so that rows end early.
    the = tok(" the")["input_ids"][0]
    config = model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = the
    try:
        assert end_token_ids(model, tok) == [the]
        prompts = ["The Eiffel Tower is located in", "Apple was founded by", "My favourite food is"]
        full = generate_full_length(model, tok, prompts, max_new_tokens=40, top_k=5, seed=3)
        stopped = generate(model, tok, prompts, max_new_tokens=40, top_k=5, seed=3)
    finally:
        config.eos_token_id = saved
    # Cut at the first end token, the full-length samples are what a stopping generation
    # draws with the same seed; past it they go on (ROME's evaluation protocol).
    assert full.ended == stopped
    assert all(t.startswith(e) for t, e in zip(full.texts, full.ended, strict=True))
    assert any(len(t) > len(e) + 20 for t, e in zip(full.texts, full.ended, strict=True))
    # Without an end token in the samples the two agree.
    plain = generate_full_length(model, tok, prompts[:1], max_new_tokens=5, top_k=None)
    assert plain.texts == plain.ended == generate(model, tok, prompts[:1], max_new_tokens=5)


def test_groups_batched_give_each_group_its_own_seeded_samples(model, tok):
    groups = [
        GenerationGroup(["Apple was founded by", "The Beatles were a band from"], 30, 11),
        GenerationGroup([EIFFEL], 18, 12),  # another length: cut from the longer batch
        GenerationGroup([], 10, 13),
        GenerationGroup(["My favourite food is", "My favourite food is"], 30, 11),
        GenerationGroup(["The capital of Japan is", "Steve Jobs was the founder of"], 25, 14),
    ]
    alone = [generate_full_length(model, tok, g.prompts, max_new_tokens=g.max_new_tokens, top_k=5, seed=g.seed)
             for g in groups]  # fmt: skip
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    together = generate_full_length_groups(model, tok, groups, top_k=5, batch_rows=64)
    assert torch.equal(torch.get_rng_state(), before), "grouped sampling changed the global RNG"
    # Packed three rows at most: groups split over calls, a call holding whole groups only.
    packed = generate_full_length_groups(model, tok, groups, top_k=5, batch_rows=3)
    assert together[2].texts == [] and packed[2].texts == []
    n = sum(len(g.prompts) for g in groups)
    for got in (together, packed):
        assert [len(g.texts) for g in got] == [len(g.prompts) for g in groups]
        same = sum(
            a == b
            for x, y in zip(got, alone, strict=True)
            for a, b in zip(x.texts, y.texts, strict=True)
        )
        # A larger padded batch moves the logits by ~1e-6, which flips a draw only when it
        # falls at a probability boundary: nearly every text is the one its group gets alone.
        assert same >= n - 1, f"{n - same} of {n} texts differ from the group's own samples"
        assert all(
            x.ended == y.ended or x.texts != y.texts for x, y in zip(got, alone, strict=True)
        )
    # It samples: the two rows of one group with the same prompt draw different texts.
    assert together[3].texts[0] != together[3].texts[1]
    # Greedy is the same in both, exactly.
    greedy = generate_full_length_groups(model, tok, groups[:2], top_k=None)
    assert [g.texts for g in greedy] == [
        generate_full_length(model, tok, g.prompts, max_new_tokens=g.max_new_tokens).texts
        for g in groups[:2]
    ]


def test_top_k_one_is_greedy(model, tok):
    assert generate(model, tok, EIFFEL, max_new_tokens=5, top_k=1) == generate(
        model, tok, EIFFEL, max_new_tokens=5
    )


@torch.no_grad()
def test_logit_lens_last_layer_is_model_distribution(model, tok):
    rows = logit_lens(model, tok, EIFFEL, top_k=5)
    assert [r.layer for r in rows] == list(range(describe(model).n_layers))
    enc = tok(EIFFEL, return_tensors="pt")
    probs = torch.softmax(model(**enc).logits[0, -1].float(), dim=-1)
    last = rows[-1]
    assert last.token_ids[0] == int(probs.argmax())
    assert last.tokens[0] == " Paris"
    for tid, p in zip(last.token_ids, last.probs, strict=True):
        assert abs(probs[tid].item() - p) < 1e-4
    # Every row is a sorted top-k of a distribution.
    for r in rows:
        assert len(r.tokens) == 5 and r.probs == sorted(r.probs, reverse=True)
        assert 0 < sum(r.probs) <= 1 + 1e-5


def test_format_lens(model, tok):
    rows = logit_lens(model, tok, EIFFEL, top_k=2)
    text = format_lens(rows)
    lines = text.splitlines()
    assert len(lines) == len(rows)
    assert lines[-1].startswith(f"layer {rows[-1].layer:>3}:") and "' Paris'" in lines[-1]
