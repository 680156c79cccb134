"""Decoding tested on fake step models: log-probs come from random tables, so every result can be
checked against an exhaustive enumeration or a plain per-image Python beam search."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from captioner.config import DecodeConfig
from captioner.decoding import Hypothesis, beam_search, decode, greedy, sample

PAD, START, END, UNK = 0, 1, 2, 3
VOCAB = 6  # pad, start, end, unk, and two words (4, 5)
SPECIALS = (PAD, START)  # suppressed in most tests
N_ROWS = 4093  # prefix codes are hashed into this many table rows


class TableModel:
    """Log-probs from a random table per image, indexed by a hash of the whole prefix fed so far.

    image_features[:, 0] is the image's table number. The state is (image_term, prefix_code): the
    image term is a (batch, 2, 3) float tensor standing in for the model's precomputed W_ih·v, so wrong
    reordering of the state across images or beams changes the log-probs.
    """

    def __init__(self, tables: torch.Tensor, expected_rows_per_image: int | None = None):
        self.tables = tables  # (n_tables, N_ROWS, VOCAB) log-probs
        self.expected_rows_per_image = expected_rows_per_image
        self.calls = 0

    def init_state(self, image_features):
        image_term = image_features[:, :1, None].expand(-1, 2, 3).clone()  # (batch, 2, 3)
        return image_term, torch.zeros(image_features.size(0), dtype=torch.long)

    def step(self, tokens, state):
        self.calls += 1
        image_term, code = state
        table = image_term[:, 0, 0].long()  # (rows,)
        if self.expected_rows_per_image:  # rows must stay grouped by image, in order (images that
            # finished early may have left the batch)
            groups = table.view(-1, self.expected_rows_per_image)
            assert bool((groups == groups[:, :1]).all()), "state rows were mixed across images"
            assert bool((groups[1:, 0] > groups[:-1, 0]).all()), "images changed order"
        code = next_code(code, tokens)
        return self.tables[table, code], (image_term, code)


def next_code(code, token):
    return (code * VOCAB + token) % N_ROWS


def make_tables(n_tables: int, seed: int, scale: float = 2.0, bias: dict[int, float] | None = None):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_tables, N_ROWS, VOCAB, generator=generator) * scale
    for token, value in (bias or {}).items():
        logits[..., token] += value
    return logits.log_softmax(dim=-1)


def features(n_images: int) -> torch.Tensor:
    return torch.arange(n_images, dtype=torch.float32).unsqueeze(1).repeat(1, 4)  # (batch, 4)


def blocked(tokens: list[int], token: int, n: int) -> bool:
    if not n or len(tokens) < n - 1:
        return False
    candidate = (*tokens[len(tokens) - n + 1:], token)
    return any(tuple(tokens[i:i + n]) == candidate for i in range(len(tokens) - n + 1))


def score(log_prob: float, length: int, length_penalty: float) -> float:
    return log_prob / length ** length_penalty


def allowed(suppress) -> list[int]:
    return [t for t in range(VOCAB) if t not in suppress]


def brute_force(tables, image, max_length, length_penalty, suppress=SPECIALS, ngram=0):
    """Every caption up to max_length (ending in <end>, or cut), best score first."""
    results = []

    def walk(code, tokens, log_prob):
        row = tables[image, code].tolist()
        length = len(tokens) + 1
        for token in allowed(suppress):
            if blocked(tokens, token, ngram) or row[token] == -math.inf:
                continue
            new_log_prob = np.float32(log_prob) + np.float32(row[token])  # float32, like the decoder
            new_score = score(float(new_log_prob), length, length_penalty)
            if token == END:
                results.append((new_score, float(new_log_prob), tokens, True))
            elif length == max_length:
                results.append((new_score, float(new_log_prob), tokens + [token], False))
            else:
                walk(next_code(code, token), tokens + [token], new_log_prob)

    walk(next_code(0, START), [], np.float32(0.0))
    return sorted(results, key=lambda r: -r[0])


def reference_beam(tables, image, config: DecodeConfig, suppress=SPECIALS):
    """Plain per-image beam search with the documented rules, no early stop."""
    beam, ngram = config.beam_size, config.no_repeat_ngram_size
    live = [(np.float32(0.0), [], next_code(0, START))]
    pool = []
    for length in range(1, config.max_length + 1):
        candidates = []
        for cum, tokens, code in live:
            row = tables[image, code].tolist()
            for token in allowed(suppress):
                if not blocked(tokens, token, ngram) and row[token] != -math.inf:
                    candidates.append((np.float32(cum) + np.float32(row[token]), tokens, token, code))
        candidates.sort(key=lambda c: -c[0])
        candidates = candidates[:2 * beam]
        for cum, tokens, token, _ in candidates[:beam]:
            if token == END:
                pool.append((score(float(cum), length, config.length_penalty), float(cum), tokens, True))
        live = [(cum, tokens + [token], next_code(code, token))
                for cum, tokens, token, code in candidates if token != END][:beam]
    pool += [(score(float(cum), config.max_length, config.length_penalty), float(cum), tokens, False)
             for cum, tokens, _ in live]
    return sorted(pool, key=lambda r: -r[0])[:config.n_best]


def sequence_log_prob(tables, image, tokens, finished) -> float:
    code, total = next_code(0, START), 0.0
    for token in tokens + ([END] if finished else []):
        total += float(tables[image, code, token])
        code = next_code(code, token)
    return total


def assert_matches(hypotheses: list[Hypothesis], expected, context=""):
    assert [h.tokens for h in hypotheses] == [e[2] for e in expected], context
    assert [h.finished for h in hypotheses] == [e[3] for e in expected], context
    for h, (e_score, e_log_prob, _, _) in zip(hypotheses, expected, strict=True):
        assert h.log_prob == pytest.approx(e_log_prob, abs=1e-5), context
        assert h.score == pytest.approx(e_score, abs=1e-5), context


@pytest.mark.parametrize("length_penalty", [0.0, 0.7])
def test_wide_beam_equals_brute_force(length_penalty):
    """With every candidate fitting in the beam, beam search is exhaustive: it must return exactly the
    brute-force ranking, several images with different tables in one batch."""
    max_length, words = 4, len(allowed(SPECIALS)) - 1  # 3 non-<end> tokens (unk and two words)
    beam_size = (words + 1) * words ** (max_length - 1)  # most candidates at any step
    tables = make_tables(3, seed=11 + int(length_penalty * 10))
    config = DecodeConfig(beam_size=beam_size, n_best=beam_size, max_length=max_length,
                          length_penalty=length_penalty)
    results = beam_search(TableModel(tables), features(3), config, START, END, SPECIALS)
    for image in range(3):
        expected = brute_force(tables, image, max_length, length_penalty)[:beam_size]
        assert_matches(results[image], expected, f"image {image}")


@pytest.mark.slow
@pytest.mark.parametrize("length_penalty", [0.0, 0.8, -0.5])
@pytest.mark.parametrize("ngram", [0, 2])
def test_beam_matches_reference_and_brute_force_log_probs(length_penalty, ngram):
    """Beam sizes 1..4 against the plain reference (exact ranking), and every hypothesis against the
    brute-force log-prob of its own tokens (back-pointers) and the brute-force best score."""
    for n_images, beam_size, max_length in itertools.product([1, 4], [1, 2, 3, 4], [4, 5]):
        tables = make_tables(n_images, seed=100 * n_images + 10 * beam_size + max_length)
        best = [brute_force(tables, image, max_length, length_penalty, ngram=ngram)[0][0]
                for image in range(n_images)]
        for n_best in sorted({1, beam_size}):
            config = DecodeConfig(beam_size=beam_size, n_best=n_best, max_length=max_length,
                                  length_penalty=length_penalty, no_repeat_ngram_size=ngram)
            model = TableModel(tables, expected_rows_per_image=beam_size)
            results = beam_search(model, features(n_images), config, START, END, SPECIALS)
            for image in range(n_images):
                context = f"image {image}/{n_images} {config}"
                assert_matches(results[image], reference_beam(tables, image, config), context)
                for h in results[image]:
                    assert h.score <= best[image] + 1e-5
                    assert h.log_prob == pytest.approx(
                        sequence_log_prob(tables, image, h.tokens, h.finished), abs=1e-5)
                    assert len(h.tokens) + h.finished <= max_length


@pytest.mark.parametrize("ngram", [0, 1, 2])
def test_beam_size_one_is_greedy(ngram):
    for seed in range(5):
        tables = make_tables(5, seed=seed, bias={END: -1.0})
        beam_config = DecodeConfig(beam_size=1, max_length=6, no_repeat_ngram_size=ngram, length_penalty=0.0)
        greedy_config = DecodeConfig(strategy="greedy", max_length=6, no_repeat_ngram_size=ngram,
                                      length_penalty=0.0)
        from_beam = beam_search(TableModel(tables), features(5), beam_config, START, END, SPECIALS)
        from_greedy = greedy(TableModel(tables), features(5), greedy_config, START, END, SPECIALS)
        assert from_beam == from_greedy  # tokens, log_prob, score and finished, exactly
        assert decode(TableModel(tables), features(5), greedy_config, START, END, SPECIALS) == from_greedy


def test_greedy_picks_the_argmax_and_stops_finished_rows():
    tables = make_tables(4, seed=3)
    results = greedy(TableModel(tables), features(4), DecodeConfig(strategy="greedy", max_length=5),
                     START, END, SPECIALS)
    for image, [h] in enumerate(results):
        code, tokens, log_prob = next_code(0, START), [], 0.0
        for _ in range(5):
            row = tables[image, code].clone()
            row[list(SPECIALS)] = -math.inf
            token = int(row.argmax())
            log_prob += float(row[token])
            if token == END:
                break
            tokens.append(token)
            code = next_code(code, token)
        assert h.tokens == tokens and h.finished == (token == END)
        assert h.log_prob == pytest.approx(log_prob, abs=1e-5)


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_never_ending_model_is_cut_at_max_length(strategy):
    tables = make_tables(3, seed=4)
    tables[..., END] = -math.inf
    n_best = 1 if strategy == "greedy" else 2
    config = DecodeConfig(strategy=strategy, beam_size=3, n_best=n_best, max_length=4, seed=0)
    results = decode(TableModel(tables), features(3), config, START, END, SPECIALS)
    assert len(results) == 3
    for image, hypotheses in enumerate(results):
        assert len(hypotheses) == n_best
        for h in hypotheses:
            assert len(h.tokens) == 4 and not h.finished and END not in h.tokens
            assert h.log_prob == pytest.approx(sequence_log_prob(tables, image, h.tokens, False), abs=1e-5)
    if strategy == "beam":
        for image in range(3):
            assert_matches(results[image], reference_beam(tables, image, config))


@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_row_with_every_token_blocked_ends(strategy):
    tables = make_tables(2, seed=14)
    tables[..., END] = -math.inf
    config = DecodeConfig(strategy=strategy, n_best=1, max_length=6, no_repeat_ngram_size=1, seed=0)
    for [h] in decode(TableModel(tables), features(2), config, START, END, SPECIALS):
        assert sorted(h.tokens) == [UNK, 4, 5] and h.finished and h.log_prob == -math.inf


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, -0.5])
def test_early_stop_saves_steps_without_changing_the_result(length_penalty):
    calls = []
    for seed in range(4):
        tables = make_tables(6, seed=20 + seed, bias={END: 1.5})
        config = DecodeConfig(beam_size=3, n_best=2, max_length=10, length_penalty=length_penalty)
        model = TableModel(tables)
        results = beam_search(model, features(6), config, START, END, SPECIALS)
        calls.append(model.calls)
        for image in range(6):
            assert_matches(results[image], reference_beam(tables, image, config), f"seed {seed}, {image}")
    if length_penalty <= 0:  # with a positive penalty the safe bound rarely allows stopping early
        assert min(calls) < 10


def test_state_rows_follow_their_image():
    """Each image strongly prefers its own word; the tag travels in the state through the reorders."""
    tables = torch.full((2, N_ROWS, VOCAB), -6.0)
    tables[0, :, 4] = tables[1, :, 5] = -0.1
    tables[:, :, END] = -3.0
    image_features = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    model = TableModel(tables)
    results = beam_search(model, image_features, DecodeConfig(beam_size=3, n_best=3, max_length=3, length_penalty=0.0),
                          START, END, SPECIALS)
    for image, hypotheses in enumerate(results):
        word = 4 if image % 2 == 0 else 5
        assert hypotheses[0].tokens == [word] * 3
        assert all(set(h.tokens) <= {word, 3, 9 - word} for h in hypotheses)
        # the cut [word]*3, then <end> at once (-3.0) beats [word] + <end> (-3.1)
        assert [h.tokens for h in hypotheses] == [[word] * 3, [], [word]]
        assert [h.log_prob for h in hypotheses] == pytest.approx([-0.3, -3.0, -3.1])


def test_bad_state_and_arguments_are_rejected():
    class LayerFirst(TableModel):
        def init_state(self, image_features):
            return (torch.zeros(1, image_features.size(0), 8),)  # (layers, batch, hidden)

    with pytest.raises(ValueError, match="batch"):
        greedy(LayerFirst(make_tables(1, 0)), features(3), DecodeConfig(strategy="greedy"), START, END)
    with pytest.raises(ValueError, match="<end>"):
        beam_search(TableModel(make_tables(1, 0)), features(1), DecodeConfig(), START, END, (PAD, END))
    with pytest.raises(ValueError, match="n_best"):
        greedy(TableModel(make_tables(1, 0)), features(1), DecodeConfig(strategy="greedy", n_best=2),
               START, END)


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_suppressed_ids_never_appear(strategy):
    tables = make_tables(3, seed=6, bias={UNK: 4.0, PAD: 4.0})
    config = DecodeConfig(strategy=strategy, beam_size=4, n_best=1 if strategy == "greedy" else 4,
                          max_length=5, seed=1)
    results = decode(TableModel(tables), features(3), config, START, END, (PAD, START, UNK))
    tokens = {t for hypotheses in results for h in hypotheses for t in h.tokens}
    assert tokens and not tokens & {PAD, START, UNK}


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
@pytest.mark.parametrize("ngram", [1, 2])
def test_no_repeat_ngram_blocks_repeats(strategy, ngram):
    tables = make_tables(3, seed=7, bias={4: 4.0, END: -4.0})  # loves repeating word 4
    config = DecodeConfig(strategy=strategy, beam_size=3, n_best=1 if strategy == "greedy" else 3,
                          max_length=5, no_repeat_ngram_size=ngram, seed=2)
    results = decode(TableModel(tables), features(3), config, START, END, SPECIALS)
    for hypotheses in results:
        for h in hypotheses:
            grams = [tuple(h.tokens[i:i + ngram]) for i in range(len(h.tokens) - ngram + 1)]
            assert len(grams) == len(set(grams)), h.tokens
    unblocked_config = DecodeConfig(strategy=strategy, beam_size=3, n_best=1, max_length=5, seed=2)
    unblocked = decode(TableModel(tables), features(3), unblocked_config, START, END, SPECIALS)
    assert any(len(set(h.tokens)) < len(h.tokens) for hs in unblocked for h in hs)  # the test has teeth


@pytest.mark.slow
def test_sampling_is_reproducible_and_seed_dependent():
    tables = make_tables(3, seed=8)

    def run(seed=None, generator=None):
        config = DecodeConfig(strategy="sample", n_best=5, max_length=5, seed=seed)
        return sample(TableModel(tables), features(3), config, START, END, SPECIALS, generator=generator)

    first = run(seed=3)
    assert run(seed=3) == first
    assert run(seed=4) != first
    assert run(generator=torch.Generator().manual_seed(3)) == first
    for image, hypotheses in enumerate(first):
        assert len(hypotheses) == 5
        assert [h.score for h in hypotheses] == sorted((h.score for h in hypotheses), reverse=True)
        for h in hypotheses:  # log_prob is the model's own, untempered
            expected = sequence_log_prob(tables, image, h.tokens, h.finished)
            assert h.log_prob == pytest.approx(expected, abs=1e-5)


def sample_many(tables, **settings):
    n_images = tables.size(0)
    config = DecodeConfig(strategy="sample", n_best=100, max_length=4, seed=0, **settings)
    return sample(TableModel(tables), features(n_images), config, START, END, SPECIALS)


def step_distributions(tables, image, hypothesis, temperature=1.0):
    """Yield (probabilities over the allowed tokens, emitted token) for every step of a sample."""
    code = next_code(0, START)
    for token in hypothesis.tokens + ([END] if hypothesis.finished else []):
        row = tables[image, code].clone()
        row[list(SPECIALS)] = -math.inf
        yield (row / temperature).softmax(0), token
        code = next_code(code, token)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_top_k_only_emits_the_top_k(temperature):
    tables = make_tables(10, seed=9, scale=0.5)  # flat, so the filter matters
    results = sample_many(tables, top_k=2, temperature=temperature)
    outside_top_1 = 0
    for image, hypotheses in enumerate(results):
        for h in hypotheses:
            for probs, token in step_distributions(tables, image, h):
                rank = int((probs > probs[token]).sum())
                assert rank < 2
                outside_top_1 += rank
    assert outside_top_1 > 0


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_top_p_only_emits_the_nucleus(temperature):
    tables = make_tables(10, seed=10, scale=1.0)
    top_p = 0.6
    results = sample_many(tables, top_p=top_p, temperature=temperature)
    for image, hypotheses in enumerate(results):
        for h in hypotheses:
            for probs, token in step_distributions(tables, image, h, temperature):
                mass_above = float(probs[probs > probs[token]].sum())
                assert mass_above < top_p  # the token is in the smallest set reaching top_p


def test_tiny_top_k_or_top_p_is_greedy():
    tables = make_tables(4, seed=12)
    expected = greedy(TableModel(tables), features(4), DecodeConfig(strategy="greedy", max_length=5),
                      START, END, SPECIALS)
    for settings in ({"top_k": 1}, {"top_p": 1e-6}):
        config = DecodeConfig(strategy="sample", n_best=3, max_length=5, seed=0, **settings)
        results = sample(TableModel(tables), features(4), config, START, END, SPECIALS)
        for image, hypotheses in enumerate(results):
            assert all(h == expected[image][0] for h in hypotheses)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sample_frequencies_follow_the_tempered_distribution(temperature):
    tables = make_tables(1, seed=13)
    config = DecodeConfig(strategy="sample", n_best=4000, max_length=1, seed=0, temperature=temperature)
    [hypotheses] = sample(TableModel(tables), features(1), config, START, END, SPECIALS)
    counts = torch.zeros(VOCAB)
    for h in hypotheses:
        counts[END if h.finished else h.tokens[0]] += 1
    row = tables[0, next_code(0, START)].clone()
    row[list(SPECIALS)] = -math.inf
    expected = (row / temperature).softmax(0)
    assert torch.allclose(counts / counts.sum(), expected, atol=0.03)


def test_images_that_stop_early_leave_the_batch():
    """Image 0 ends at once with certainty; image 1 never ends: after the first step only image 1's beams
    are computed, and both get the captions they would get alone."""
    tables = make_tables(2, seed=3)
    tables[0, :, :] = -math.inf
    tables[0, :, END] = 0.0
    tables[1, :, END] = -math.inf
    rows_seen = []

    class Counting(TableModel):
        def step(self, tokens, state):
            rows_seen.append(tokens.numel())
            return super().step(tokens, state)

    config = DecodeConfig(beam_size=3, n_best=1, max_length=5, length_penalty=0.0)
    together = beam_search(Counting(tables), features(2), config, START, END, SPECIALS)
    assert rows_seen == [6, 3, 3, 3, 3]
    alone = beam_search(TableModel(tables), features(2)[1:], config, START, END, SPECIALS)
    assert together[0][0].tokens == [] and together[0][0].finished
    assert together[1] == alone[0]
