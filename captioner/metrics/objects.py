"""Object-mention F1: does a caption name the COCO objects that the people describing the photo named?

For each of COCO's 80 object categories, `coco_objects.tsv` (hand-written, in this package) lists the word
forms captions use: plurals and common synonyms ("person": man, women, kids, skier, ...; "cell phone":
phone, cellphone, ...). A caption *mentions* a category when one of its forms occurs in the caption's
tokens (`captioner.text.tokenize`, as the other metrics tokenise), longer forms first ("hot dog" is not a
dog). An image's *true* objects are those at least `min_references` (2) of its references mention, or
all of them when it has fewer references. Precision, recall and F1 are pooled over images (micro):

    tp = sum over images |mentioned & true|,  fp = |mentioned - true|,  fn = |true - mentioned|

BLEU and CIDEr-D reward any shared n-gram ("a man in a blue shirt"); this asks only whether the caption
names what is in the photo, which is what a model trained on another world of photos gets wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from captioner.metrics.common import Hypotheses, References, prepare_inputs
from captioner.text import tokenize

OBJECTS_FILE = "coco_objects.tsv"
NUM_CATEGORIES = 80


class ObjectTableError(ValueError):
    """A problem in the object table file; the message names the line."""


@dataclass(frozen=True)
class ObjectTable:
    """COCO object categories and their word forms, indexed for matching token sequences."""

    forms: dict[str, tuple[tuple[str, ...], ...]]  # category -> its forms, each a token tuple
    # first token -> [(form tokens, category)], longest form first: the order the matcher tries them
    by_first_token: dict[str, list[tuple[tuple[str, ...], str]]]

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(self.forms)

    @classmethod
    def from_forms(cls, forms: dict[str, Sequence[str]]) -> ObjectTable:
        """Build from {category: [form, ...]}; a form is space-separated tokens. A form may belong to
        only one category (else a mention would count twice)."""
        owner: dict[tuple[str, ...], str] = {}
        token_forms: dict[str, tuple[tuple[str, ...], ...]] = {}
        for category, category_forms in forms.items():
            tokens_of = []
            for form in category_forms:
                tokens = tuple(form.split())
                if not tokens or list(tokens) != tokenize(form):
                    raise ObjectTableError(f"{category!r}: form {form!r} is not lowercase tokens as "
                                           "captioner.text.tokenize writes them")
                if tokens in owner:
                    raise ObjectTableError(f"form {form!r} belongs to both {owner[tokens]!r} and {category!r}")
                owner[tokens] = category
                tokens_of.append(tokens)
            if not tokens_of:
                raise ObjectTableError(f"{category!r} has no forms")
            token_forms[category] = tuple(tokens_of)
        index: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        for tokens, category in owner.items():
            index.setdefault(tokens[0], []).append((tokens, category))
        for candidates in index.values():
            candidates.sort(key=lambda entry: -len(entry[0]))
        return cls(token_forms, index)

    def mentions(self, tokens: Sequence[str]) -> set[str]:
        """The categories a tokenised caption mentions. Left to right, the longest form starting at each
        token wins and uses up its tokens ("a hot dog" -> hot dog, not dog)."""
        found: set[str] = set()
        position = 0
        while position < len(tokens):
            for form, category in self.by_first_token.get(tokens[position], ()):
                if tuple(tokens[position:position + len(form)]) == form:
                    found.add(category)
                    position += len(form)
                    break
            else:
                position += 1
        return found


@lru_cache(maxsize=1)
def load_object_table() -> ObjectTable:
    """The package's COCO object table (read and checked once per process)."""
    text = resources.files(__package__).joinpath(OBJECTS_FILE).read_text(encoding="utf-8")
    forms: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise ObjectTableError(f"{OBJECTS_FILE}:{number}: expected 'category<TAB>form, form, ...'")
        category = fields[0].strip()
        if category in forms:
            raise ObjectTableError(f"{OBJECTS_FILE}:{number}: category {category!r} is listed twice")
        forms[category] = [form.strip() for form in fields[1].split(",") if form.strip()]
    if len(forms) != NUM_CATEGORIES:
        raise ObjectTableError(f"{OBJECTS_FILE}: {len(forms)} categories, expected COCO's {NUM_CATEGORIES}")
    try:
        return ObjectTable.from_forms(forms)
    except ObjectTableError as error:
        raise ObjectTableError(f"{OBJECTS_FILE}: {error}") from None


def mention_counts(references: Sequence[Sequence[str]], hypothesis: Sequence[str], table: ObjectTable,
                   min_references: int = 2) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of one image, from token lists."""
    votes: dict[str, int] = {}
    for reference in references:
        for category in table.mentions(reference):
            votes[category] = votes.get(category, 0) + 1
    needed = min(min_references, len(references))  # an image with one reference: that one decides
    truth = {category for category, count in votes.items() if count >= needed}
    said = table.mentions(hypothesis)
    return len(said & truth), len(said - truth), len(truth - said)


def f1_from_counts(true_positives: int, false_positives: int, false_negatives: int) -> dict[str, float]:
    """Precision, recall and F1. A 0/0 ratio is 0, except that nothing true and nothing mentioned (all
    counts 0) is perfect agreement: 1 for all three."""
    if true_positives + false_positives + false_negatives == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    claimed, true = true_positives + false_positives, true_positives + false_negatives
    return {"precision": true_positives / claimed if claimed else 0.0,
            "recall": true_positives / true if true else 0.0,
            "f1": 2 * true_positives / (2 * true_positives + false_positives + false_negatives)}


def object_mention_f1(references: References, captions: Hypotheses, *, min_references: int = 2,
                      tokenized: bool = False, table: ObjectTable | None = None) -> dict:
    """Object-mention precision, recall and F1 of `captions` against `references`, pooled over images.

    Inputs as every scorer takes them ({id: [reference, ...]}, {id: caption}; same ids). Returns
    {"precision", "recall", "f1": floats in 0..1, "true_positives", "false_positives", "false_negatives",
    "images": ints, "per_image": {id: {"precision", "recall", "f1"}}}.
    """
    if min_references < 1:
        raise ValueError(f"min_references must be at least 1, got {min_references}")
    table = table or load_object_table()
    ids, all_refs, all_hyps = prepare_inputs(references, captions, tokenized)
    totals = [0, 0, 0]
    per_image = {}
    for image_id, refs, hyp in zip(ids, all_refs, all_hyps, strict=True):
        counts = mention_counts(refs, hyp, table, min_references)
        per_image[image_id] = f1_from_counts(*counts)
        totals = [total + count for total, count in zip(totals, counts, strict=True)]
    return {**f1_from_counts(*totals), "true_positives": totals[0], "false_positives": totals[1],
            "false_negatives": totals[2], "images": len(ids), "per_image": per_image}
