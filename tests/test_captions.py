"""decode_features with concepts: the ImageNet logits choose concepts, beam search is made to mention them,
every caption carries them, and without them (or with the threshold None) decoding is exactly as before."""

from __future__ import annotations

import pytest
import torch
from helpers import CAPTION_WORDS

from captioner.concepts import load_concept_map
from captioner.config import MAX_CONSTRAINTS, DecodeConfig, ModelConfig, RerankConfig
from captioner.decoding import decode_features
from captioner.decoding.memory import CaptionMemory
from captioner.decoding.rerank import ConsensusReranker
from captioner.model import CaptionDecoder
from captioner.text import Vocabulary

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models crawl with spinning threads

FEATURE_DIM = 16
N_IMAGES = 4


@pytest.fixture(scope="module")
def tiny():
    """An untrained decoder over CAPTION_WORDS (which hold "dog" and "cat"), and four images' features."""
    torch.manual_seed(0)
    vocab = Vocabulary.build([CAPTION_WORDS], min_count=1)
    model = CaptionDecoder(ModelConfig(vocab_size=len(vocab), feature_dim=FEATURE_DIM, embed_dim=8, hidden_dim=12,
                                       image_dim=8, dropout=0.0)).eval()
    features = torch.randn(N_IMAGES, FEATURE_DIM, generator=torch.Generator().manual_seed(1))
    return model, vocab, features


def confident_logits(words_per_image: list[list[str]], logit: float = 12.0) -> torch.Tensor:
    """(images, 1000) ImageNet logits: uniform, except the first class of each listed concept word, raised so
    that the concept is confident (two words per image share the probability, each ~0.5)."""
    concept_map = load_concept_map()
    logits = torch.zeros(len(words_per_image), 1000)
    for row, words in enumerate(words_per_image):
        for word in words:
            logits[row, concept_map.classes_of(word)[0]] = logit
    return logits


def texts(captions) -> list[list[str]]:
    return [[c.text for c in image] for image in captions]


def same_captions(got, expected, tolerance: float = 1e-4) -> bool:
    """The same captions with the same concepts and outcome, their log-probs and scores within `tolerance`."""
    return len(got) == len(expected) and all(
        len(a) == len(b) and all(
            (x.text, x.finished, x.concepts, x.constraints_met) == (y.text, y.finished, y.concepts, y.constraints_met)
            and x.log_prob == pytest.approx(y.log_prob, abs=tolerance) and x.score == pytest.approx(y.score, abs=tolerance)
            for x, y in zip(a, b, strict=True))
        for a, b in zip(got, expected, strict=True))


def test_decode_config_checks_the_concept_settings():
    assert DecodeConfig().concept_threshold is not None and DecodeConfig().max_constraints == MAX_CONSTRAINTS
    assert DecodeConfig(concept_threshold=None).concept_threshold is None  # concepts off
    DecodeConfig(concept_threshold=0.0, max_constraints=0)
    DecodeConfig(concept_threshold=1, max_constraints=MAX_CONSTRAINTS)
    for bad in (-0.1, 1.5, "0.3", True, float("nan")):
        with pytest.raises(ValueError, match="concept_threshold"):
            DecodeConfig(concept_threshold=bad)
    for bad in (-1, MAX_CONSTRAINTS + 1, 1.0, True):
        with pytest.raises(ValueError, match="max_constraints"):
            DecodeConfig(max_constraints=bad)


def test_beam_search_is_made_to_say_a_confident_concept(tiny):
    model, vocab, features = tiny
    config = DecodeConfig(beam_size=3, n_best=2, max_length=8)
    plain = decode_features(model, vocab, features, config)
    assert not any("cat" in c.text.split() for c in plain[0])  # the untrained model does not say it by itself
    logits = confident_logits([["cat"], [], ["cat", "dog"], []])
    captions = decode_features(model, vocab, features, config, concept_logits=logits)
    assert all("cat" in c.text.split() for c in captions[0])
    cat_p = logits[0].softmax(0)[load_concept_map().classes_of("cat")].sum().item()
    assert [c.word for c in captions[0][0].concepts] == ["cat"] and captions[0][0].concepts[0].p == pytest.approx(cat_p)
    assert all(c.constraints_met is True for c in captions[0])
    # two concepts: both said (or else the plain caption, flagged)
    assert {c.word for c in captions[2][0].concepts} == {"cat", "dog"}
    for caption in captions[2]:
        said = {"cat", "dog"} <= set(caption.text.split())
        assert caption.constraints_met is said
    # images without a confident concept get plain beam search's captions, and no concepts
    for image in (1, 3):
        assert texts([captions[image]]) == texts([plain[image]])
        assert all(c.concepts == [] and c.constraints_met is None for c in captions[image])


def test_threshold_none_or_no_confident_concept_is_exactly_plain_beam_search(tiny):
    model, vocab, features = tiny
    config = DecodeConfig(beam_size=3, n_best=3, max_length=8)
    plain = decode_features(model, vocab, features, config)
    logits = confident_logits([["cat"]] * N_IMAGES)
    off = decode_features(model, vocab, features, DecodeConfig(beam_size=3, n_best=3, max_length=8,
                                                               concept_threshold=None), concept_logits=logits)
    assert off == plain  # texts, log-probs, scores, and no concepts
    uniform = decode_features(model, vocab, features, config, concept_logits=torch.zeros(N_IMAGES, 1000))
    assert uniform == plain  # every concept is far below the threshold
    none_allowed = decode_features(model, vocab, features, DecodeConfig(beam_size=3, n_best=3, max_length=8,
                                                                        max_constraints=0), concept_logits=logits)
    assert none_allowed == plain


def test_a_concept_the_vocabulary_cannot_say_is_left_out(tiny):
    model, vocab, features = tiny
    assert "zebra" not in vocab.index
    config = DecodeConfig(beam_size=2, max_length=8)
    captions = decode_features(model, vocab, features[:1], config, concept_logits=confident_logits([["zebra"]]))
    assert captions == decode_features(model, vocab, features[:1], config)


def test_greedy_and_sampling_report_concepts_without_constraints(tiny):
    model, vocab, features = tiny
    logits = confident_logits([["cat"]] * N_IMAGES)
    for config in (DecodeConfig(strategy="greedy", max_length=8),
                   DecodeConfig(strategy="sample", max_length=8, seed=3, n_best=2)):
        plain = decode_features(model, vocab, features, config)
        with_concepts = decode_features(model, vocab, features, config, concept_logits=logits)
        assert texts(with_concepts) == texts(plain)
        assert all([c.word for c in caption.concepts] == ["cat"] and caption.constraints_met is None
                   for image in with_concepts for caption in image)


def test_chunks_do_not_change_constrained_captions(tiny):
    model, vocab, features = tiny
    logits = confident_logits([["cat"], [], ["dog"], ["cat", "dog"]])
    config = DecodeConfig(beam_size=3, max_length=8)
    whole = decode_features(model, vocab, features, config, concept_logits=logits)
    for batch_size in (1, 3):
        # the same captions; log-probs agree up to float summation order, which the CPU's kernels and the
        # batch shape choose
        chunked = decode_features(model, vocab, features, config, batch_size=batch_size, concept_logits=logits)
        assert same_captions(chunked, whole)


def test_logits_must_match_the_features(tiny):
    model, vocab, features = tiny
    with pytest.raises(ValueError, match="3 rows for 4 images"):
        decode_features(model, vocab, features, DecodeConfig(), concept_logits=torch.zeros(3, 1000))


def test_reranking_chooses_among_candidates_that_say_the_concept(tiny):
    model, vocab, features = tiny
    memory = CaptionMemory(["m0", "m1"], torch.randn(2, FEATURE_DIM, generator=torch.Generator().manual_seed(2)),
                           [["a dog runs on the grass"], ["a man sits on the beach"]], {"encoder": "test"})
    reranker = ConsensusReranker(memory, RerankConfig(neighbours=1, candidates=4))
    config = DecodeConfig(beam_size=3, n_best=2, max_length=8)
    logits = confident_logits([["cat"], [], [], []])
    reranked = decode_features(model, vocab, features, config, reranker=reranker, concept_logits=logits)
    assert all("cat" in c.text.split() and c.constraints_met and c.consensus is not None
               and [k.word for k in c.concepts] == ["cat"] for c in reranked[0])
    plain = decode_features(model, vocab, features, config, reranker=reranker)
    assert texts(reranked[1:]) == texts(plain[1:])
