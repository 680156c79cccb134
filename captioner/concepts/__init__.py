"""Concepts: the caption words that the CNN's own ImageNet classifier recognises in a photo.

Two hand-written data files in this package say what people call what ImageNet names:

- `imagenet_words.tsv`: each of the 1000 ImageNet classes (index, torchvision's short name) -> the caption
  words for it, comma-separated, or none ("tabby" -> cat; every dog breed -> dog; "espresso" -> coffee;
  "washbasin" -> sink; "ballplayer" -> baseball, player). A class may give several words when a caption
  would use either of two different things ("beer bottle" -> bottle, beer).
- `concept_forms.tsv`: each concept word -> the word forms a caption may use for it: plurals and the
  near-synonyms captions use interchangeably ("airplane": airplane airplanes plane planes jet jets ...).
  Synonyms live here, not in the class map, so one photo of an airliner is one concept, not three.

A concept's probability is the summed softmax probability of the classes that map to it (a class giving
several words contributes its probability to each). `ConceptDetector` turns ImageNet logits into concepts;
`constraint_concepts` picks the few confident concepts a caption should be made to mention, and
`concept_token_ids` their forms that a vocabulary knows (for constrained beam search).
`concept_logits_for` gives a door the ImageNet logits of the features it already has, from its CNN's own
classifier (None when the CNN has none worth asking: then concepts are off).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from captioner.encoders.registry import Encoder

NUM_CLASSES = 1000
WORD_MAP_FILE = "imagenet_words.tsv"
FORMS_FILE = "concept_forms.tsv"


class ConceptMapError(ValueError):
    """A concept data file that cannot be used; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class ConceptMap:
    """The class -> word map and the word -> forms map, as read from the package's data files."""

    class_names: tuple[str, ...]  # (1000,) torchvision's short ImageNet names
    class_words: tuple[tuple[str, ...], ...]  # (1000,) the caption words of each class, maybe none
    forms: Mapping[str, tuple[str, ...]]  # concept word -> its forms, the word itself first

    @property
    def words(self) -> tuple[str, ...]:
        """Every concept word, sorted."""
        return tuple(sorted(self.forms))

    def classes_of(self, word: str) -> list[int]:
        """The ImageNet class indices that map to `word`."""
        return [i for i, words in enumerate(self.class_words) if word in words]

    def class_to_concept_matrix(self) -> Tensor:
        """(1000, n_words) 0/1 matrix, rows classes, columns `words`: probabilities @ it = concept probabilities."""
        column = {word: j for j, word in enumerate(self.words)}
        matrix = torch.zeros(NUM_CLASSES, len(column))
        for i, words in enumerate(self.class_words):
            for word in words:
                matrix[i, column[word]] = 1.0
        return matrix


def _data_lines(name: str) -> list[tuple[int, list[str]]]:
    """(line number, tab-separated fields) of a package data file, skipping comments and blank lines."""
    text = resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    return [(number, line.split("\t")) for number, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.startswith("#")]


@lru_cache(maxsize=1)
def load_concept_map() -> ConceptMap:
    """Read and check the package's two data files (once per process)."""
    names: list[str] = []
    class_words: list[tuple[str, ...]] = []
    for number, fields in _data_lines(WORD_MAP_FILE):
        if len(fields) != 3:
            raise ConceptMapError(f"{WORD_MAP_FILE}:{number}: expected 3 tab-separated fields "
                                  f"(index, class name, words), got {len(fields)}")
        index, name, words = fields
        if not index.isdigit() or int(index) != len(names):
            raise ConceptMapError(f"{WORD_MAP_FILE}:{number}: class index {index!r}, expected {len(names)} "
                                  "(one line per class, in order)")
        names.append(name)
        class_words.append(tuple(w.strip() for w in words.split(",") if w.strip()))
    if len(names) != NUM_CLASSES:
        raise ConceptMapError(f"{WORD_MAP_FILE}: {len(names)} classes, expected {NUM_CLASSES}")
    forms: dict[str, tuple[str, ...]] = {}
    for number, fields in _data_lines(FORMS_FILE):
        if len(fields) != 2 or not fields[1].split():
            raise ConceptMapError(f"{FORMS_FILE}:{number}: expected 'word<TAB>form form ...'")
        word, word_forms = fields[0], tuple(fields[1].split())
        if word_forms[0] != word:
            raise ConceptMapError(f"{FORMS_FILE}:{number}: the forms of {word!r} must start with the word itself")
        if word in forms:
            raise ConceptMapError(f"{FORMS_FILE}:{number}: {word!r} is listed twice")
        forms[word] = word_forms
    used = {w for words in class_words for w in words}
    if used != set(forms):
        missing, unused = sorted(used - set(forms)), sorted(set(forms) - used)
        raise ConceptMapError(f"{FORMS_FILE} does not match {WORD_MAP_FILE}: words without forms {missing}, "
                              f"forms of words no class gives {unused}")
    return ConceptMap(tuple(names), tuple(class_words), forms)


@dataclass(frozen=True)
class Concept:
    word: str
    p: float  # summed ImageNet probability of the classes mapping to the word


class ConceptDetector:
    """ImageNet logits -> concepts, each image's best first.

    threshold: keep concepts with p >= threshold; top_k: at most this many per image (0: no limit).
    """

    def __init__(self, threshold: float = 0.3, top_k: int = 5, concept_map: ConceptMap | None = None) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.threshold, self.top_k = threshold, top_k
        self.concept_map = concept_map or load_concept_map()
        self.words = self.concept_map.words
        self._matrix = self.concept_map.class_to_concept_matrix()  # (1000, n_words)

    def probabilities(self, logits: Tensor) -> Tensor:
        """(batch, 1000) ImageNet logits -> (batch, n_words) concept probabilities, columns as `words`."""
        if logits.dim() != 2 or logits.size(1) != NUM_CLASSES:
            raise ValueError(f"expected ImageNet logits of shape (batch, {NUM_CLASSES}), got {tuple(logits.shape)}")
        return logits.float().softmax(dim=1) @ self._matrix.to(logits.device)

    def __call__(self, logits: Tensor) -> list[list[Concept]]:
        """(batch, 1000) logits -> for each image, its concepts with p >= threshold, best first."""
        probabilities = self.probabilities(logits)
        limit = probabilities.size(1) if self.top_k == 0 else min(self.top_k, probabilities.size(1))
        top_p, top_index = probabilities.topk(limit, dim=1)
        return [[Concept(self.words[j], p) for p, j in zip(ps, js, strict=True) if p >= self.threshold]
                for ps, js in zip(top_p.tolist(), top_index.tolist(), strict=True)]


def concept_forms(word: str, concept_map: ConceptMap | None = None) -> tuple[str, ...]:
    """The forms a caption may use for concept `word` (the word itself first)."""
    concept_map = concept_map or load_concept_map()
    try:
        return concept_map.forms[word]
    except KeyError:
        raise ValueError(f"{word!r} is not a concept word (see {FORMS_FILE})") from None


def mentions(tokens: Iterable[str], word: str, concept_map: ConceptMap | None = None) -> bool:
    """Whether tokenised text mentions concept `word` in any of its forms."""
    return not set(concept_forms(word, concept_map)).isdisjoint(tokens)


def concept_token_ids(word: str, vocab_index: Mapping[str, int], concept_map: ConceptMap | None = None) -> list[int]:
    """The ids, in a vocabulary's word -> id mapping, of the forms of `word` it knows (maybe none)."""
    return [vocab_index[form] for form in concept_forms(word, concept_map) if form in vocab_index]


def constraint_concepts(concepts: Sequence[Concept], max_constraints: int = 2,
                        vocab_index: Mapping[str, int] | None = None,
                        concept_map: ConceptMap | None = None) -> list[Concept]:
    """The concepts a caption should be made to mention: best first, at most `max_constraints`.

    Skipped: a concept no form of which is in `vocab_index` (when given; the caption could never say it),
    and a concept that shares an ImageNet class with one already chosen (a hen gives "chicken" and
    "bird": asking for both would force "a chicken bird").
    """
    concept_map = concept_map or load_concept_map()
    chosen: list[Concept] = []
    covered: set[int] = set()
    for concept in concepts:
        if len(chosen) == max_constraints:
            break
        if vocab_index is not None and not concept_token_ids(concept.word, vocab_index, concept_map):
            continue
        classes = set(concept_map.classes_of(concept.word))
        if classes & covered:
            continue
        chosen.append(concept)
        covered |= classes
    return chosen


def imagenet_head(model: torch.nn.Module, feature_dim: int) -> torch.nn.Linear:
    """The ImageNet classifier of a CNN (an `Encoder.model`): its Linear layer from the pooled features
    (feature_dim) to the 1000 classes. Applied to the features the decoder already gets, it gives the
    ImageNet logits for one small matrix product, without a second pass of the CNN."""
    heads = [m for m in model.modules()
             if isinstance(m, torch.nn.Linear) and m.in_features == feature_dim and m.out_features == NUM_CLASSES]
    if len(heads) != 1:
        raise ValueError(f"{type(model).__name__}: expected one Linear({feature_dim} -> {NUM_CLASSES}) ImageNet "
                         f"head, found {len(heads)}")
    return heads[0]


def concept_logits_for(encoder: Encoder, features: Tensor) -> Tensor | None:
    """ImageNet logits (N, 1000) for pooled features (N, feature_dim) that `encoder` made, from its own
    classifier (`imagenet_head`); None when it has no such head, or its weights are random (a test or smoke
    encoder: its classes mean nothing), so that concepts are simply off for it."""
    if encoder.weights_hash.startswith("random"):
        return None
    try:
        head = imagenet_head(encoder.model, encoder.feature_dim)
    except ValueError:
        return None
    with torch.inference_mode():
        return head(features.to(device=head.weight.device, dtype=head.weight.dtype))
