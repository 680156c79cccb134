"""The ImageNet class -> caption word map (a sample pinned), concept probabilities and constraint choice."""

from __future__ import annotations

import math

import pytest
import torch

from captioner.concepts import (
    NUM_CLASSES,
    Concept,
    ConceptDetector,
    concept_forms,
    concept_logits_for,
    concept_token_ids,
    constraint_concepts,
    imagenet_head,
    load_concept_map,
    mentions,
)
from captioner.text import tokenize


def index_of(name: str) -> int:
    return load_concept_map().class_names.index(name)


def test_map_covers_the_imagenet_classes_in_torchvision_order():
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    concept_map = load_concept_map()
    assert concept_map.class_names == tuple(_IMAGENET_CATEGORIES)
    assert len(concept_map.class_words) == NUM_CLASSES
    assert all(forms[0] == word for word, forms in concept_map.forms.items())


@pytest.mark.parametrize("class_name, words", [
    ("tabby", ("cat",)), ("tiger cat", ("cat",)), ("Persian cat", ("cat",)), ("Egyptian cat", ("cat",)),
    ("espresso", ("coffee",)), ("studio couch", ("couch",)), ("washbasin", ("sink",)), ("four-poster", ("bed",)),
    ("airliner", ("airplane",)), ("warplane", ("airplane",)), ("trolleybus", ("bus",)), ("school bus", ("bus",)),
    ("ram", ("sheep",)), ("alp", ("mountain",)), ("ballplayer", ("baseball", "player")), ("zebra", ("zebra",)),
    ("banana", ("banana", "fruit")), ("broccoli", ("broccoli", "vegetables")), ("pizza", ("pizza",)),
    ("toaster", ("toaster",)), ("microwave", ("microwave",)), ("laptop", ("laptop", "computer")),
    ("umbrella", ("umbrella",)), ("refrigerator", ("refrigerator",)), ("toilet seat", ("toilet",)),
    ("sorrel", ("horse",)), ("ox", ("cow",)), ("tusker", ("elephant",)), ("ice bear", ("bear",)),
    # names that would mislead a word-for-word map
    ("kite", ("bird",)), ("plane", ()), ("pitcher", ()), ("crane bird", ("bird",)), ("hotdog", ("hotdog",)),
])
def test_map_sample(class_name, words):
    assert load_concept_map().class_words[index_of(class_name)] == words


def test_every_dog_breed_is_a_dog():
    concept_map = load_concept_map()
    breeds = range(index_of("Chihuahua"), index_of("Mexican hairless") + 1)
    assert len(breeds) == 118
    assert all(concept_map.class_words[i] == ("dog",) for i in breeds)
    assert {index_of("golden retriever"), index_of("pug"), index_of("Siberian husky")} <= set(breeds)
    # wolves and foxes are not dogs in captions
    assert concept_map.class_words[index_of("timber wolf")] == ("wolf",)
    assert concept_map.class_words[index_of("red fox")] == ("fox",)


def test_forms_include_plurals_and_caption_synonyms():
    assert {"airplane", "airplanes", "plane", "planes", "jet", "jets"} <= set(concept_forms("airplane"))
    assert {"couch", "sofa"} <= set(concept_forms("couch"))
    assert {"dog", "dogs", "puppy"} <= set(concept_forms("dog"))
    assert concept_forms("sheep")[0] == "sheep"
    assert mentions(tokenize("Two planes parked on the runway."), "airplane")
    assert not mentions(tokenize("A plain field."), "airplane")
    with pytest.raises(ValueError, match="not a concept word"):
        concept_forms("zorble")


def fake_logits(probabilities: dict[str, float]) -> torch.Tensor:
    """(1, 1000) logits whose softmax puts exactly these probabilities on these classes, 0 elsewhere."""
    logits = torch.full((1, NUM_CLASSES), -math.inf)
    for name, p in probabilities.items():
        logits[0, index_of(name)] = math.log(p)
    return logits


def test_concept_probability_is_the_sum_over_its_classes():
    # two cat classes, a class giving two words (bottle and beer), and a class giving none
    logits = fake_logits({"tabby": 0.3, "tiger cat": 0.2, "beer bottle": 0.4, "trilobite": 0.1})
    detector = ConceptDetector(threshold=0.0, top_k=0)
    probabilities = dict(zip(detector.words, detector.probabilities(logits)[0].tolist(), strict=True))
    assert probabilities["cat"] == pytest.approx(0.5)
    assert probabilities["bottle"] == pytest.approx(0.4)
    assert probabilities["beer"] == pytest.approx(0.4)
    assert sum(probabilities.values()) == pytest.approx(0.5 + 0.4 + 0.4)

    concepts = ConceptDetector(threshold=0.3, top_k=5)(logits)[0]
    assert concepts[0].word == "cat" and concepts[0].p == pytest.approx(0.5)
    assert {c.word for c in concepts[1:]} == {"bottle", "beer"}
    assert [c.word for c in ConceptDetector(threshold=0.45)(logits)[0]] == ["cat"]
    assert len(ConceptDetector(threshold=0.3, top_k=2)(logits)[0]) == 2


def test_detector_batches_and_checks_its_input():
    logits = torch.cat([fake_logits({"espresso": 0.9, "cup": 0.1}), fake_logits({"washbasin": 1.0})])
    concepts = ConceptDetector(threshold=0.5)(logits)
    assert [[c.word for c in cs] for cs in concepts] == [["coffee"], ["sink"]]
    with pytest.raises(ValueError, match="ImageNet logits"):
        ConceptDetector()(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="threshold"):
        ConceptDetector(threshold=1.5)


def test_constraints_skip_overlapping_and_unsayable_concepts():
    hen = [Concept("chicken", 0.8), Concept("bird", 0.8), Concept("dog", 0.4), Concept("cat", 0.3)]
    assert [c.word for c in constraint_concepts(hen)] == ["chicken", "dog"]  # bird shares the hen class
    vocab = {"<end>": 2, "bird": 5, "dog": 6, "dogs": 7, "cat": 8}
    # "chicken" is not in this vocabulary, so nothing stops "bird"
    assert [c.word for c in constraint_concepts(hen, 2, vocab)] == ["bird", "dog"]
    assert [c.word for c in constraint_concepts(hen, 1, vocab)] == ["bird"]
    assert [c.word for c in constraint_concepts(hen[2:], 2, {"cat": 8})] == ["cat"]
    assert concept_token_ids("dog", vocab) == [6, 7]
    assert concept_token_ids("zebra", vocab) == []


@pytest.mark.slow
def test_imagenet_head_on_features_is_the_classifier():
    from captioner.encoders import get_encoder

    encoder = get_encoder("efficientnet_lite0")
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    head = imagenet_head(encoder.model, encoder.feature_dim)
    with torch.inference_mode():
        from_features = head(encoder(pixels))
    torch.testing.assert_close(from_features, encoder.classify(pixels), rtol=1e-4, atol=1e-4)


class _FakeEncoder:
    """What concept_logits_for reads of an `Encoder`: its model, feature size and weights hash."""

    def __init__(self, model: torch.nn.Module, weights_hash: str = "abc", feature_dim: int = 8):
        self.model, self.weights_hash, self.feature_dim = model, weights_hash, feature_dim


def test_concept_logits_come_from_the_encoders_classifier_or_are_off():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, NUM_CLASSES)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), head)
    features = torch.randn(5, 8)
    logits = concept_logits_for(_FakeEncoder(model), features)
    torch.testing.assert_close(logits, head(features).detach())
    # random weights: classes that mean nothing, so no concepts; no 1000-class head: none either
    assert concept_logits_for(_FakeEncoder(model, weights_hash="random-1234"), features) is None
    assert concept_logits_for(_FakeEncoder(torch.nn.Sequential(torch.nn.Linear(8, 10))), features) is None
