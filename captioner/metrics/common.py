"""What every scorer shares: the input checks and tokenisation, and n-gram counting.

Every scorer has `compute_score(references, hypotheses) -> (corpus_score, per_image)`:

    references: {image_id: [reference caption, ...]}   (at least one per image)
    hypotheses: {image_id: generated caption}           (the same ids)

Both sides are raw strings, tokenised here with `captioner.text.tokenize` (lowercase, punctuation dropped,
as coco-caption's PTB step does) unless `tokenized=True` says they are already space-joined tokens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

from captioner.text import tokenize

ImageId = Hashable
References = Mapping[ImageId, Sequence[str]]
Hypotheses = Mapping[ImageId, str]

# "Obj-F1": object-mention F1 (captioner.metrics.objects), not a coco-caption metric; kept short for tables.
METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D", "ROUGE-L", "Obj-F1")


def preview_ids(ids: Sequence[ImageId], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}]"


def prepare_inputs(references: References, hypotheses: Hypotheses, tokenized: bool
             ) -> tuple[list[ImageId], list[list[list[str]]], list[list[str]]]:
    """Check the inputs and tokenise them -> (ids, refs[image][ref] tokens, hyps[image] tokens)."""
    missing = [i for i in references if i not in hypotheses]
    extra = [i for i in hypotheses if i not in references]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"ids with references but no hypothesis ({len(missing)}): {preview_ids(missing)}")
        if extra:
            parts.append(f"ids with a hypothesis but no references ({len(extra)}): {preview_ids(extra)}")
        raise ValueError("references and hypotheses must have the same image ids; " + "; ".join(parts))

    split = str.split if tokenized else tokenize
    ids = list(references)
    all_refs, all_hyps = [], []
    for image_id in ids:
        refs = references[image_id]
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise ValueError(f"references[{image_id!r}] must be a list of caption strings, "
                             f"got {type(refs).__name__}")
        if len(refs) == 0:
            raise ValueError(f"references[{image_id!r}] is empty: every image needs at least one reference")
        if not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{image_id!r}] must contain only strings")
        hyp = hypotheses[image_id]
        # Accept COCO-style one-element lists as well as plain strings.
        if isinstance(hyp, (list, tuple)) and len(hyp) == 1:
            hyp = hyp[0]
        if not isinstance(hyp, str):
            raise ValueError(f"hypotheses[{image_id!r}] must be one caption string, got {type(hyp).__name__}")
        all_refs.append([split(r) for r in refs])
        all_hyps.append(split(hyp))
    return ids, all_refs, all_hyps


def ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    """Counts of every 1..n-gram (as tuples) in `tokens`."""
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))
