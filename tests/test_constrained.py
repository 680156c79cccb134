"""Beam search with constraints (`beam_search(constraints=)`) on a fake step model whose log-probs come from
random tables, checked against brute-force enumeration of every caption, against the plain beam search,
and one image at a time. An image without constraints is searched as plain beam search (constraints_met
None); one with constraints gets True, or False with the plain captions when none meeting them exists."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from captioner.config import DecodeConfig
from captioner.decoding import beam_search

PAD, START, END = 0, 1, 2
WORDS = (3, 4, 5)
VOCAB = 6
SUPPRESS = (PAD, START)
N_ROWS = 2039  # prefix codes are hashed into this many table rows


class ToyModel:
    """Log-probs from a random table per image, looked up by a hash of the whole prefix. The state carries
    the image's table number as a float 'image term', so mixing up rows across images changes the output."""

    def __init__(self, tables: torch.Tensor):
        self.tables = tables  # (n_tables, N_ROWS, VOCAB) log-probs

    def init_state(self, image_features):
        return image_features[:, :1].clone(), torch.zeros(image_features.size(0), dtype=torch.long)

    def step(self, tokens, state):
        image_term, code = state
        code = next_code(code, tokens)
        return self.tables[image_term[:, 0].long(), code], (image_term, code)


def next_code(code, token):
    return (code * VOCAB + token) % N_ROWS


def make_tables(n_tables: int, seed: int, end_bias: float = 0.0) -> torch.Tensor:
    logits = torch.randn(n_tables, N_ROWS, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2.0
    logits[..., END] += end_bias
    return logits.log_softmax(dim=-1)


def features(n_images: int) -> torch.Tensor:
    return torch.arange(n_images, dtype=torch.float32).unsqueeze(1).repeat(1, 3)


def repeats_ngram(tokens: list[int], token: int, n: int) -> bool:
    if not n or len(tokens) < n - 1:
        return False
    candidate = (*tokens[len(tokens) - n + 1:], token)
    return any(tuple(tokens[i:i + n]) == candidate for i in range(len(tokens) - n + 1))


def brute_force(tables, image, config: DecodeConfig, constraints=(), suppress=SUPPRESS):
    """Every caption up to max_length (ended by <end>, or cut) that meets every constraint, best first,
    as (score, log_prob, tokens, finished)."""
    results = []

    def walk(code, tokens, log_prob):
        row = tables[image, code].tolist()
        length = len(tokens) + 1
        for token in range(VOCAB):
            if token in suppress or repeats_ngram(tokens, token, config.no_repeat_ngram_size) \
                    or row[token] == -math.inf:
                continue
            new_log_prob = np.float32(log_prob) + np.float32(row[token])  # float32, like the search
            new_score = float(new_log_prob) / length ** config.length_penalty
            if token == END or length == config.max_length:
                caption = tokens if token == END else tokens + [token]
                if all(set(caption) & set(c) for c in constraints):
                    results.append((new_score, float(new_log_prob), caption, token == END))
            else:
                walk(next_code(code, token), tokens + [token], new_log_prob)

    walk(next_code(0, START), [], np.float32(0.0))
    return sorted(results, key=lambda r: -r[0])


def assert_matches(hypotheses, expected, context=""):
    assert [h.tokens for h in hypotheses] == [e[2] for e in expected], context
    assert [h.finished for h in hypotheses] == [e[3] for e in expected], context
    for h, (score, log_prob, _, _) in zip(hypotheses, expected, strict=True):
        assert h.score == pytest.approx(score, abs=1e-5), context
        assert h.log_prob == pytest.approx(log_prob, abs=1e-5), context


def assert_same(a, b, context=""):
    assert [(h.tokens, h.finished, h.constraints_met) for h in a] == \
           [(h.tokens, h.finished, h.constraints_met) for h in b], context
    for x, y in zip(a, b, strict=True):
        assert x.score == pytest.approx(y.score, abs=1e-6) and x.log_prob == pytest.approx(y.log_prob, abs=1e-6)


CONSTRAINTS = [[], [[3]], [[4], [5]], [[3, 5]], [[5], [3, 4]]]


@pytest.mark.parametrize("length_penalty", [0.0, 0.7])
@pytest.mark.parametrize("ngram", [0, 2])
def test_wide_beam_equals_brute_force(length_penalty, ngram):
    """With a beam wide enough to hold every candidate of every state, the search is exhaustive: it must
    return exactly the brute-force ranking of the captions that meet the constraints."""
    max_length = 4
    beam_size = (len(WORDS) + 1) * len(WORDS) ** (max_length - 1)  # most candidates at any step
    tables = make_tables(len(CONSTRAINTS), seed=7 + ngram + int(10 * length_penalty))
    config = DecodeConfig(beam_size=beam_size, n_best=beam_size, max_length=max_length,
                          length_penalty=length_penalty, no_repeat_ngram_size=ngram)
    results = beam_search(ToyModel(tables), features(len(CONSTRAINTS)), config, START, END, SUPPRESS,
                          constraints=CONSTRAINTS)
    for image, constraints in enumerate(CONSTRAINTS):
        expected = brute_force(tables, image, config, constraints)[:beam_size]
        assert expected, "the toy set-up should allow captions meeting the constraints"
        assert_matches(results[image], expected, f"image {image}, constraints {constraints}")
        assert all(h.constraints_met is (True if constraints else None) for h in results[image])


@pytest.mark.parametrize("length_penalty", [0.0, 0.5])
def test_narrow_beams_meet_the_constraints(length_penalty):
    """Every caption from a narrow beam meets its constraints, carries its own tokens' log-prob, and
    scores no better than the brute-force best."""
    for beam_size, max_length in [(1, 5), (2, 4), (3, 6)]:
        tables = make_tables(len(CONSTRAINTS), seed=beam_size * 10 + max_length, end_bias=1.0)
        config = DecodeConfig(beam_size=beam_size, n_best=beam_size, max_length=max_length,
                              length_penalty=length_penalty)
        results = beam_search(ToyModel(tables), features(len(CONSTRAINTS)), config, START, END, SUPPRESS,
                              constraints=CONSTRAINTS)
        for image, constraints in enumerate(CONSTRAINTS):
            best = brute_force(tables, image, config, constraints)[0][0]
            assert results[image], f"image {image}"
            for h in results[image]:
                assert h.constraints_met is (True if constraints else None)
                assert all(set(h.tokens) & set(c) for c in constraints)
                assert h.score <= best + 1e-5
                code, log_prob = next_code(0, START), 0.0
                for token in h.tokens + ([END] if h.finished else []):
                    log_prob += float(tables[image, code, token])
                    code = next_code(code, token)
                assert h.log_prob == pytest.approx(log_prob, abs=1e-5)
            scores = [h.score for h in results[image]]
            assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("beam_size, n_best", [(1, 1), (2, 1), (3, 3), (5, 2)])
@pytest.mark.parametrize("length_penalty, ngram", [(0.0, 0), (0.5, 2), (-0.3, 1)])
def test_without_constraints_it_is_the_plain_beam_search(beam_size, n_best, length_penalty, ngram):
    tables = make_tables(4, seed=beam_size + n_best)
    config = DecodeConfig(beam_size=beam_size, n_best=n_best, max_length=6, length_penalty=length_penalty,
                          no_repeat_ngram_size=ngram)
    plain = beam_search(ToyModel(tables), features(4), config, START, END, SUPPRESS)
    constrained = beam_search(ToyModel(tables), features(4), config, START, END, SUPPRESS, constraints=[[]] * 4)
    for image in range(4):
        assert [(h.tokens, h.log_prob, h.score, h.finished) for h in constrained[image]] == \
               [(h.tokens, h.log_prob, h.score, h.finished) for h in plain[image]]  # exactly
        assert all(h.constraints_met is None for h in constrained[image])


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_batch_gives_what_each_image_gets_alone(beam_size):
    """Images with 0, 1 and 2 constraints share one search; each must get what it gets searched alone."""
    tables = make_tables(len(CONSTRAINTS), seed=3, end_bias=0.5)
    config = DecodeConfig(beam_size=beam_size, n_best=beam_size, max_length=7, length_penalty=0.5)
    together = beam_search(ToyModel(tables), features(len(CONSTRAINTS)), config, START, END, SUPPRESS,
                           constraints=CONSTRAINTS)
    for image, constraints in enumerate(CONSTRAINTS):
        alone = beam_search(ToyModel(tables), features(len(CONSTRAINTS))[image:image + 1], config,
                            START, END, SUPPRESS, constraints=[constraints])
        assert_same(together[image], alone[0], f"image {image}")


def test_unmet_constraints_fall_back_to_the_plain_caption_and_say_so():
    tables = make_tables(3, seed=5)
    config = DecodeConfig(beam_size=3, n_best=2, max_length=1)  # one token: two constraints cannot fit
    constraints = [[[3], [4]], [[3]], [[PAD]]]  # the third asks for a suppressed token
    results = beam_search(ToyModel(tables), features(3), config, START, END, SUPPRESS, constraints=constraints)
    plain = beam_search(ToyModel(tables), features(3), config, START, END, SUPPRESS)
    for image in (0, 2):
        assert [h.constraints_met for h in results[image]] == [False] * len(plain[image])
        assert [(h.tokens, h.score) for h in results[image]] == [(h.tokens, h.score) for h in plain[image]]
    assert results[1] and all(h.constraints_met and h.tokens == [3] for h in results[1])


def test_bad_constraints_are_refused():
    model, config = ToyModel(make_tables(1, seed=0)), DecodeConfig(beam_size=2, max_length=3)
    with pytest.raises(ValueError, match="at most 2"):
        beam_search(model, features(1), config, START, END, SUPPRESS, constraints=[[[3], [4], [5]]])
    with pytest.raises(ValueError, match="no token ids"):
        beam_search(model, features(1), config, START, END, SUPPRESS, constraints=[[[]]])
    with pytest.raises(ValueError, match="not words"):
        beam_search(model, features(1), config, START, END, SUPPRESS, constraints=[[[END]]])
    with pytest.raises(ValueError, match="not words"):
        beam_search(model, features(1), config, START, END, SUPPRESS, constraints=[[[VOCAB]]])
    with pytest.raises(ValueError, match="2 lists for 1 images"):
        beam_search(model, features(1), config, START, END, SUPPRESS, constraints=[[], []])
