"""EditRequest validation and conversions; subject token ranges; prompt/target batches."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from factedit.requests import EditRequest, InvalidRequestError, as_requests, requests_to_json
from factedit.scoring import target_token_logprobs
from factedit.tokens import encode_target, prompt_target_batch, subject_token_range

# ---- EditRequest validation -----------------------------------------------------------------


def test_valid_request_views():
    r = EditRequest("{} was the founder of", "Steve Jobs", "Microsoft", target_true="Apple")
    assert r.text == "Steve Jobs was the founder of"
    assert r.target_text == " Microsoft"
    assert r.true_text == " Apple"
    # A target that already starts with a space is kept as written.
    assert EditRequest("{} is in", "Paris", " France").target_text == " France"


@pytest.mark.parametrize(
    ("prompt", "subject", "target", "match"),
    [
        ("Steve Jobs was the founder of", "Steve Jobs", "Microsoft", "exactly one"),
        ("{} and {} founded", "Steve Jobs", "Microsoft", "found 2"),
        ("{} was the founder of", "", "Microsoft", "subject is empty"),
        ("{} was the founder of", "   ", "Microsoft", "subject is empty"),
        ("{} was the founder of", "Steve Jobs", "", "target_new is empty"),
        ("{} was the founder of", "Steve Jobs", "  ", "target_new is empty"),
    ],
)
def test_invalid_requests(prompt, subject, target, match):
    with pytest.raises(InvalidRequestError, match=match):
        EditRequest(prompt, subject, target)


def test_missing_placeholder_suggests_fix():
    with pytest.raises(InvalidRequestError, match=r"did you mean '\{\} was the founder of'"):
        EditRequest("Steve Jobs was the founder of", "Steve Jobs", "Microsoft")


def test_empty_target_true_rejected():
    with pytest.raises(InvalidRequestError, match="target_true is empty"):
        EditRequest("{} was the founder of", "Steve Jobs", "Microsoft", target_true=" ")


def test_invalid_request_is_a_value_error():
    # Callers that catch ValueError (the CLI) see request problems too.
    assert issubclass(InvalidRequestError, ValueError)


# ---- from_filled ----------------------------------------------------------------------------


def test_from_filled_puts_placeholder_where_subject_stands():
    r = EditRequest.from_filled("Steve Jobs was the founder of", "Steve Jobs", "Microsoft")
    assert r.prompt == "{} was the founder of"
    assert r.text == "Steve Jobs was the founder of"


def test_from_filled_replaces_first_occurrence_only():
    r = EditRequest.from_filled("Paris is the capital of Paris", "Paris", "Texas")
    assert r.prompt == "{} is the capital of Paris"


def test_from_filled_accepts_template():
    r = EditRequest.from_filled("{} was the founder of", "Steve Jobs", "Microsoft")
    assert r.prompt == "{} was the founder of"


def test_from_filled_subject_not_in_prompt():
    with pytest.raises(InvalidRequestError, match="not found in prompt"):
        EditRequest.from_filled("Bill Gates was the founder of", "Steve Jobs", "Microsoft")


@pytest.mark.parametrize("subject", ["", "  "])
def test_from_filled_empty_subject(subject):
    with pytest.raises(InvalidRequestError, match="subject is empty"):
        EditRequest.from_filled("Steve Jobs was the founder of", subject, "Microsoft")


# ---- from_any -------------------------------------------------------------------------------


def test_from_any_seed_dict():
    seed = {
        "prompt": "{} was the founder of",
        "subject": "Steve Jobs",
        "target_new": {"str": "Microsoft"},
    }
    r = EditRequest.from_any(seed)
    assert (r.prompt, r.subject, r.target_new, r.target_true) == (
        "{} was the founder of",
        "Steve Jobs",
        "Microsoft",
        None,
    )
    assert EditRequest.from_any(r) is r


def test_from_any_plain_string_targets_and_filled_prompt():
    r = EditRequest.from_any(
        {"prompt": "Steve Jobs was the founder of", "subject": "Steve Jobs", "target_new": "Microsoft",
         "target_true": "Apple"}
    )  # fmt: skip
    assert r.prompt == "{} was the founder of"
    assert r.target_true == "Apple"


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"prompt": "{} was", "subject": "X"}, "lacks field"),
        ({"prompt": "{} was", "subject": "X", "target_new": {"id": "Q1"}}, "'str'"),
        ({"prompt": "{} was", "subject": "X", "target_new": 3}, "must be a string"),
        (["{} was", "X", "Y"], "must be a dict"),
    ],
)
def test_from_any_bad_input(obj, match):
    with pytest.raises(InvalidRequestError, match=match):
        EditRequest.from_any(obj)


def test_to_dict_round_trip():
    r = EditRequest(
        "{} was the founder of", "Steve Jobs", "Microsoft", target_true="Apple", case_id=7
    )
    d = r.to_dict()
    assert d["target_new"] == {"str": "Microsoft"}
    assert EditRequest.from_any(json.loads(json.dumps(d))) == r
    assert requests_to_json([r]) == [d]


def test_counterfact_records(data_dir):
    records = json.loads((data_dir / "counterfact" / "counterfact_dev.json").read_text())[:50]
    for rec in records:
        r = EditRequest.from_any(rec)
        rr = rec["requested_rewrite"]
        assert r.case_id == rec["case_id"]
        assert r.prompt == rr["prompt"]
        assert r.subject == rr["subject"]
        assert r.target_new == rr["target_new"]["str"]
        assert r.target_true == rr["target_true"]["str"]
        assert rr["subject"] in r.text


def test_flat_counterfact_records(data_dir):
    # EasyEdit's flat layout: the subject already stands in the prompt.
    records = json.loads((data_dir / "counterfact" / "counterfact-val.json").read_text())[:50]
    for rec in records:
        r = EditRequest.from_any(
            {"prompt": rec["prompt"], "subject": rec["subject"], "target_new": rec["target_new"]}
        )
        assert r.text == rec["prompt"]
        assert r.prompt.count("{}") == 1


def test_as_requests():
    d = {"prompt": "{} was", "subject": "X", "target_new": "Y"}
    assert len(as_requests(d)) == 1
    assert len(as_requests([d, EditRequest.from_any(d)])) == 2
    with pytest.raises(InvalidRequestError, match="no edit requests"):
        as_requests([])


def test_check_tokenizer(tok):
    EditRequest("{} was the founder of", "Steve Jobs", "Microsoft").check_tokenizer(tok)


# ---- subject_token_range --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "subject"),
    [
        ("The Eiffel Tower is located in the city of", "Eiffel Tower"),
        ("Danielle Darrieux's mother tongue is", "Danielle Darrieux"),
        ("Steve Jobs was the founder of", "Steve Jobs"),
    ],
)
def test_subject_token_range_real_tokenizer(tok, text, subject):
    ids = tok(text)["input_ids"]
    start, end = subject_token_range(tok, text, subject)
    assert 0 <= start < end <= len(ids)
    assert tok.decode(ids[start:end]).strip() == subject
    # The range is tight: dropping either end loses part of the subject.
    assert tok.decode(ids[start + 1 : end]).strip() != subject
    assert tok.decode(ids[start : end - 1]).strip() != subject


def test_subject_token_range_occurrence(tok):
    text = "Paris is far from Paris, Texas"
    first = subject_token_range(tok, text, "Paris")
    second = subject_token_range(tok, text, "Paris", occurrence=1)
    assert second[0] > first[1] - 1
    ids = tok(text)["input_ids"]
    assert tok.decode(ids[second[0] : second[1]]).strip() == "Paris"


def test_subject_token_range_missing(tok):
    with pytest.raises(ValueError, match="not found"):
        subject_token_range(tok, "The Eiffel Tower is in", "Louvre")
    with pytest.raises(ValueError, match="not found"):
        subject_token_range(tok, "Paris is far", "Paris", occurrence=1)


def test_subject_token_range_with_bos(tok):
    # A Gemma-like tokenizer that prepends BOS: indices shift by one and still hit the subject.
    bos_tok = copy.deepcopy(tok)
    bos_tok.add_bos_token = True
    text, subject = "The Eiffel Tower is located in", "Eiffel Tower"
    ids = bos_tok(text)["input_ids"]
    assert ids[0] == bos_tok.bos_token_id and ids[1:] == tok(text)["input_ids"]
    plain = subject_token_range(tok, text, subject)
    with_bos = subject_token_range(bos_tok, text, subject)
    assert with_bos == (plain[0] + 1, plain[1] + 1)
    assert bos_tok.decode(ids[with_bos[0] : with_bos[1]]).strip() == subject


# ---- prompt_target_batch / scoring ----------------------------------------------------------

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "The mother tongue of Danielle Darrieux is",
]
TARGETS = [" Paris, France", " French"]


def test_prompt_target_batch_positions(tok):
    b = prompt_target_batch(tok, PROMPTS, TARGETS)
    for i, (p, t) in enumerate(zip(PROMPTS, TARGETS, strict=True)):
        pid, tid = tok(p)["input_ids"], encode_target(tok, t)
        n = len(pid) + len(tid) - 1
        row = b.input_ids[i]
        # Left padding: the real tokens sit at the right end, the mask marks them.
        assert b.attention_mask[i].sum().item() == n
        assert b.attention_mask[i, -n:].all()
        assert row[-n:].tolist() == pid + tid[:-1]
        assert b.target_ids[i] == tid
        assert b.prompt_last[i] == b.input_ids.shape[1] - n + len(pid) - 1
        assert row[b.prompt_last[i]].item() == pid[-1]
        assert b.target_positions[i][0] == b.prompt_last[i]
        assert len(b.target_positions[i]) == len(tid)
        # Position j predicts target token j, so the next position reads it (teacher forcing).
        for j, pos in enumerate(b.target_positions[i][:-1]):
            assert row[pos + 1].item() == tid[j]
        assert b.target_positions[i][-1] == b.input_ids.shape[1] - 1
    lengths = b.attention_mask.sum(dim=1)
    assert lengths[0] != lengths[1], "the test needs rows of different lengths"
    assert b.attention_mask[int(lengths.argmin()), 0] == 0  # the shorter row is padded on the left


def test_prompt_target_batch_bad_input(tok):
    with pytest.raises(ValueError, match="differ in length"):
        prompt_target_batch(tok, PROMPTS, TARGETS[:1])
    with pytest.raises(ValueError, match="no tokens"):
        prompt_target_batch(tok, PROMPTS[:1], [""])
    with pytest.raises(ValueError, match="no tokens"):
        prompt_target_batch(tok, [""], [" Paris"])


@torch.no_grad()
def test_target_token_logprobs_match_manual_forward(model, tok):
    scored = target_token_logprobs(model, tok, PROMPTS, TARGETS)
    for p, t, got in zip(PROMPTS, TARGETS, scored, strict=True):
        pid, tid = tok(p)["input_ids"], encode_target(tok, t)
        ids = torch.tensor([pid + tid])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        want = torch.stack([logp[len(pid) - 1 + j, tid[j]] for j in range(len(tid))])
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # Batch size 1 and the padded batch agree.
    single = target_token_logprobs(model, tok, PROMPTS, TARGETS, batch_size=1)
    for a, b in zip(scored, single, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
