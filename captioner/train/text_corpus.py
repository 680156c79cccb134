"""Captions without photos as training data: each gets a pseudo image vector made from the objects it names.

A decoder learns its words and sentences from captions, but a caption only teaches the image-conditioned
path (`W_ih·v` in the gates) when it comes with an image vector v. Text-only captions with a zero or
learned "no image" vector teach the decoder to talk one way without an image and another with one (a
calibration run: COCO text that way left coco-dev unchanged). Here each text-only caption gets the
vector a photo of what it describes would roughly give: the mean training feature, moved along the
direction the CNN's own ImageNet classifier associates with each concept the caption names, far enough
that the classifier gives that concept `target_p` of its probability. So "a zebra standing in a field"
trains the decoder to say "zebra" when the features point where the zebra class points, which is where
a real zebra photo's features point too (the decoder sees the same CNN's features at test time).

- A concept word and its forms come from the reviewed map in `captioner.concepts` (`concept_forms.tsv`):
  "planes" and "jet" both name the concept "airplane".
- The direction of a concept: the mean classifier row of its ImageNet classes minus the mean row of all
  1000, as a unit vector. The step along it is found by bisection, once per concept.
- A caption naming several concepts (at most `max_concepts`, in order of mention) adds their steps.
- A caption naming no concept is left out: it would get the mean vector, which is the "no image" case
  that teaches the two-ways-of-talking split.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from captioner.concepts import ConceptMap, imagenet_head, load_concept_map
from captioner.data.records import CaptionRecord, DataFormatError
from captioner.encoders import get_encoder
from captioner.text import tokenize

TEXT_CORPUS_FILE = "coco_captions_text.json"
TEXT_ONLY_PATH = Path("/nonexistent/text-only")  # text-only records have no image file; nothing opens it


def read_text_corpus(path: str | Path) -> list[str]:
    """Caption strings of a text corpus: a JSON file `{"captions": [{"caption": ...}, ...]}` (the layout of
    ../shared/data/coco-text), a folder holding `coco_captions_text.json`, or a plain text file with one
    caption per line. A bad entry is named by its index."""
    path = Path(path)
    if path.is_dir():
        path = path / TEXT_CORPUS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such text corpus (a JSON file of captions, or a folder with "
                                f"{TEXT_CORPUS_FILE}, or a text file with one caption per line)")
    if path.suffix != ".json":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{path}: not valid JSON ({error})") from None
    entries = data.get("captions") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DataFormatError(f"{path}: expected an object with a 'captions' list")
    captions = []
    for index, entry in enumerate(entries):
        caption = entry.get("caption") if isinstance(entry, dict) else None
        if not isinstance(caption, str) or not caption.strip():
            raise DataFormatError(f"{path}: captions[{index}] has no 'caption' string: {entry!r:.80}")
        captions.append(caption.strip())
    return captions


@dataclass
class PseudoVectors:
    """Pseudo image vectors from an ImageNet head (weight (1000, D), bias (1000,)) and a mean feature (D,)."""

    weight: Tensor
    bias: Tensor
    mean_feature: Tensor
    concept_map: ConceptMap
    target_p: float = 0.6

    def __post_init__(self) -> None:
        if not 0.0 < self.target_p < 1.0:
            raise ValueError(f"target_p must be in (0, 1), got {self.target_p}")
        self.weight, self.bias = self.weight.detach().float(), self.bias.detach().float()
        self.mean_feature = self.mean_feature.detach().float()
        self.form_to_word = {form: word for word, forms in self.concept_map.forms.items() for form in forms}
        self.mean_row = self.weight.mean(0)
        self.steps: dict[str, Tensor] = {}

    def probability(self, vector: Tensor, classes: list[int]) -> float:
        """The classifier's summed probability of `classes` at `vector`."""
        return torch.softmax(self.weight @ vector + self.bias, 0)[classes].sum().item()

    def step(self, word: str) -> Tensor:
        """The displacement from the mean feature that makes the classifier give `word` target_p."""
        if word not in self.steps:
            classes = self.concept_map.classes_of(word)
            direction = self.weight[classes].mean(0) - self.mean_row
            direction = direction / direction.norm()
            low, high = 0.0, 1.0
            while self.probability(self.mean_feature + high * direction, classes) < self.target_p:
                high *= 2
                if high > 1e4:
                    raise ValueError(f"concept {word!r}: the classifier never gives it p >= {self.target_p}")
            for _ in range(30):
                middle = (low + high) / 2
                if self.probability(self.mean_feature + middle * direction, classes) < self.target_p:
                    low = middle
                else:
                    high = middle
            self.steps[word] = high * direction
        return self.steps[word]

    def concepts_named(self, tokens: list[str]) -> list[str]:
        """The concept words a tokenised caption names, in order of first mention, each once."""
        found: list[str] = []
        for token in tokens:
            word = self.form_to_word.get(token)
            if word is not None and word not in found:
                found.append(word)
        return found

    def vector(self, words: list[str]) -> Tensor:
        vector = self.mean_feature.clone()
        for word in words:
            vector += self.step(word)
        return vector


def text_only_examples(captions: list[str], pseudo: PseudoVectors, max_concepts: int = 3,
                       prefix: str = "text") -> tuple[list[CaptionRecord], Tensor, Counter]:
    """Records (split "train", one caption each) and their pseudo image vectors (N, D) for the captions
    that name at least one concept, and a count of the concepts used (for the run's description)."""
    records: list[CaptionRecord] = []
    vectors: list[Tensor] = []
    used: Counter = Counter()
    for index, caption in enumerate(captions):
        words = pseudo.concepts_named(tokenize(caption))[:max_concepts]
        if not words:
            continue
        used.update(words)
        records.append(CaptionRecord(f"{prefix}-{index}", TEXT_ONLY_PATH, [caption], "train"))
        vectors.append(pseudo.vector(words))
    features = torch.stack(vectors) if vectors else torch.empty(0, pseudo.mean_feature.numel())
    return records, features, used


def pseudo_vectors_for(head: torch.nn.Linear, train_features: Tensor, target_p: float = 0.6,
                       concept_map: ConceptMap | None = None) -> PseudoVectors:
    """PseudoVectors from a CNN's ImageNet head and the training photos' features (their mean is the start)."""
    if head.in_features != train_features.size(1):
        raise ValueError(f"the ImageNet head takes {head.in_features}-dim features, the training features have "
                         f"{train_features.size(1)}")
    return PseudoVectors(head.weight, head.bias, train_features.float().mean(0),
                         concept_map or load_concept_map(), target_p)


def text_corpus_examples(corpus: str | Path, splits: dict, target_p: float = 0.6,
                         max_concepts: int = 3) -> tuple[list[CaptionRecord], Tensor, str]:
    """Text-only training examples from a corpus file for `cached_splits` output (its train features and
    its encoder entry, whose CNN's ImageNet head makes the directions), and a line describing them."""
    captions = read_text_corpus(corpus)
    name = splits["encoder"].get("encoder")
    if not name:
        raise ValueError("the feature cache names no encoder; text-only examples need its ImageNet head")
    encoder = get_encoder(name, fuse_batchnorm=False)  # only its classifier runs
    pseudo = pseudo_vectors_for(imagenet_head(encoder.model, encoder.feature_dim), splits["train_features"],
                                target_p)
    records, features, used = text_only_examples(captions, pseudo, max_concepts)
    common = ", ".join(f"{w} {n}" for w, n in used.most_common(8))
    return records, features, (f"text corpus {corpus}: {len(records)} of {len(captions)} captions name one of "
                               f"{len(used)} concepts and train with pseudo image vectors (most named: {common})")


def corpus_fingerprint(records: list[CaptionRecord]) -> str:
    """A short hash of text-only records' captions, so a resumed run checks it has the same text."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(record.captions[0].encode("utf-8") + b"\n")
    return digest.hexdigest()[:16]
