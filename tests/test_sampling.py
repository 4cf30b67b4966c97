"""Sampling: top-k and top-p cut the distribution where they should; seeds reproduce."""

from __future__ import annotations

import torch

from model.engine.sampling import SamplingParams, make_generator, sample_token

LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


def draws(params: SamplingParams, count: int = 400) -> set[int]:
    generator = make_generator(params, torch.device("cpu"))
    return {sample_token(LOGITS, params, generator) for _ in range(count)}


def test_greedy_takes_the_argmax():
    assert sample_token(LOGITS, SamplingParams(), None) == 0


def test_top_k_keeps_the_k_most_likely():
    assert draws(SamplingParams(temperature=1.0, top_k=2, seed=0)) == {0, 1}


def test_top_p_keeps_the_smallest_set_covering_p():
    assert draws(SamplingParams(temperature=1.0, top_p=0.7, seed=0)) == {0, 1}
    assert draws(SamplingParams(temperature=1.0, top_p=0.4, seed=0)) == {0}


def test_without_cuts_every_token_appears():
    assert draws(SamplingParams(temperature=1.0, seed=0)) == {0, 1, 2, 3}


def test_same_seed_same_samples():
    params = SamplingParams(temperature=1.0, seed=123)
    first, second = make_generator(params, "cpu"), make_generator(params, "cpu")
    a = [sample_token(LOGITS, params, first) for _ in range(20)]
    b = [sample_token(LOGITS, params, second) for _ in range(20)]
    assert a == b


def test_invalid_params_are_named():
    problems = SamplingParams(max_tokens=0, top_p=0.0, top_k=-1).problems()
    assert [field for field, _ in problems] == ["max_tokens", "top_p", "top_k"]


def test_a_vanishing_temperature_is_greedy_and_a_seed_beyond_64_bits_is_refused():
    assert SamplingParams(temperature=1e-30).is_greedy
    assert not SamplingParams(temperature=0.01).is_greedy
    assert SamplingParams(seed=2**64).problems() == [
        ("seed", f"must be a 64-bit signed integer, got {2**64}")]
    assert SamplingParams(seed=-(2**63)).problems() == []
