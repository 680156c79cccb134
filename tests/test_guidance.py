"""Soft concept guidance: a bonus on a guide word's forms until the caption says one of them."""

from __future__ import annotations

import math

import pytest
import torch

from captioner.config import DecodeConfig
from captioner.decoding import beam_search, greedy
from captioner.guidance import GuidedModel, guidance_bonus

START, END, VOCAB = 1, 2, 7
N_ROWS = 997


class ToyModel:
    """Random log-probs per image, looked up by a hash of the prefix; the image number rides in the state."""

    def __init__(self, n_images: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.tables = (torch.randn(n_images, N_ROWS, VOCAB, generator=generator) * 2).log_softmax(-1)

    def init_state(self, image_features):
        return image_features[:, :1].clone(), torch.zeros(image_features.size(0), dtype=torch.long)

    def step(self, tokens, state):
        image, code = state
        code = (code * VOCAB + tokens) % N_ROWS
        return self.tables[image[:, 0].long(), code], (image, code)


def features(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).unsqueeze(1)


def test_bonus_applies_until_a_form_is_said():
    model = ToyModel(1)
    guided = GuidedModel(model, guidance_bonus([[([4, 5], 3.0)]], VOCAB))
    state = guided.init_state(features(1))
    plain_state = model.init_state(features(1))
    start = torch.tensor([START])
    log_probs, state = guided.step(start, state)
    plain, plain_state = model.step(start, plain_state)
    expected = plain.clone()
    expected[:, [4, 5]] += 3.0
    torch.testing.assert_close(log_probs, expected.log_softmax(1))
    assert math.isclose(log_probs.exp().sum().item(), 1.0, rel_tol=1e-5)
    # a word that is not a form: the bonus stays
    log_probs, state = guided.step(torch.tensor([3]), state)
    plain, plain_state = model.step(torch.tensor([3]), plain_state)
    expected = plain.clone()
    expected[:, [4, 5]] += 3.0
    torch.testing.assert_close(log_probs, expected.log_softmax(1))
    # a form is said: the bonus is gone, the model's own log-probs come back
    log_probs, state = guided.step(torch.tensor([5]), state)
    plain, plain_state = model.step(torch.tensor([5]), plain_state)
    torch.testing.assert_close(log_probs, plain.log_softmax(1))


def test_no_bonus_is_the_plain_search():
    model, config = ToyModel(3, seed=1), DecodeConfig(beam_size=3, n_best=2, max_length=6)
    guided = GuidedModel(model, guidance_bonus([[], [([3], 0.0)], []], VOCAB))
    plain = beam_search(model, features(3), config, START, END, (0, START))
    nudged = beam_search(guided, features(3), config, START, END, (0, START))
    for a, b in zip(plain, nudged, strict=True):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)


def test_a_large_bonus_makes_greedy_say_the_word_once_and_batches_stay_apart():
    model, config = ToyModel(2, seed=2), DecodeConfig(strategy="greedy", max_length=8)
    guides = [[([6], 50.0)], [([4], 50.0)]]
    together = greedy(GuidedModel(model, guidance_bonus(guides, VOCAB)), features(2), config, START, END, (0, 1))
    for image, word in enumerate((6, 4)):
        assert together[image][0].tokens[0] == word  # the bonus wins the first step
        alone = greedy(GuidedModel(ToyModel(2, seed=2), guidance_bonus([guides[image]], VOCAB)),
                       features(2)[image:image + 1], config, START, END, (0, 1))
        assert alone[0][0].tokens == together[image][0].tokens


def test_bad_bonuses_are_refused():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        guidance_bonus([[([VOCAB], 1.0)]], VOCAB)
    with pytest.raises(ValueError, match=">= 0"):
        guidance_bonus([[([3], -1.0)]], VOCAB)
    with pytest.raises(ValueError, match="bonuses for 2 images"):
        GuidedModel(ToyModel(1), guidance_bonus([[], []], VOCAB)).init_state(features(1))
