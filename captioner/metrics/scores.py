"""All metrics at once: BLEU-1..4, CIDEr-D, ROUGE-L and object-mention F1 of captions against their references."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from captioner.metrics.bleu import Bleu
from captioner.metrics.cider import CiderD
from captioner.metrics.common import Hypotheses, References, prepare_inputs
from captioner.metrics.objects import object_mention_f1
from captioner.metrics.rouge import RougeL


def compute_scores(references: References, hypotheses: Hypotheses, *, tokenized: bool = False) -> dict:
    """BLEU-1..4, CIDEr-D, ROUGE-L and object-mention F1 of `hypotheses` against `references`.

    Returns {"BLEU-1": float, ..., "BLEU-4", "CIDEr-D", "ROUGE-L", "Obj-F1", "per_image": {id: {metric:
    float}}}. BLEU, ROUGE-L and Obj-F1 are on a 0..1 scale; CIDEr-D on its usual 0..10 scale.
    (`metrics.objects.object_mention_f1` gives Obj-F1's precision, recall and counts.)
    """
    if not tokenized:  # tokenise once and share it between the scorers
        ids, refs, hyps = prepare_inputs(references, hypotheses, tokenized=False)
        references = {i: [" ".join(r) for r in rs] for i, rs in zip(ids, refs, strict=True)}
        hypotheses = {i: " ".join(h) for i, h in zip(ids, hyps, strict=True)}
    bleu, bleu_per_image = Bleu(4).compute_score(references, hypotheses, tokenized=True)
    cider, cider_per_image = CiderD().compute_score(references, hypotheses, tokenized=True)
    rouge, rouge_per_image = RougeL().compute_score(references, hypotheses, tokenized=True)
    objects = object_mention_f1(references, hypotheses, tokenized=True)

    scores: dict = {f"BLEU-{k + 1}": float(b) for k, b in enumerate(bleu)}
    scores["CIDEr-D"] = cider
    scores["ROUGE-L"] = rouge
    scores["Obj-F1"] = objects["f1"]
    scores["per_image"] = {
        image_id: {**{f"BLEU-{k + 1}": b for k, b in enumerate(bleu_per_image[image_id])},
                   "CIDEr-D": cider_per_image[image_id], "ROUGE-L": rouge_per_image[image_id],
                   "Obj-F1": objects["per_image"][image_id]["f1"]}
        for image_id in bleu_per_image
    }
    return scores


def captions_by_image(records: Sequence[Any], captions: Sequence[str | Sequence[Any]]
                      ) -> tuple[dict[Any, Sequence[str]], dict[Any, str]]:
    """({image_id: references}, {image_id: caption}) for one caption per record (`.image_id`, `.captions`):
    the dicts every scorer takes. `captions[i]` is a string, or an n-best list whose first entry's `.text`
    is the caption. The one place validation, evaluation and the scripts pair captions with references."""
    references = {r.image_id: r.captions for r in records}
    hypotheses = {r.image_id: caption if isinstance(caption, str) else caption[0].text
                  for r, caption in zip(records, captions, strict=True)}
    return references, hypotheses


def score_captions(records: Sequence[Any], captions: Sequence[str | Sequence[Any]]) -> dict:
    """`compute_scores` of one caption per record against that record's references (`captions_by_image`)."""
    return compute_scores(*captions_by_image(records, captions))
