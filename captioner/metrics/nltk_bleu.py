"""BLEU-1..4 as most tutorials and course projects report it: nltk's `corpus_bleu`, no smoothing.

Our headline BLEU (`captioner.metrics`) follows coco-caption, which the papers use. Users comparing with
a tutorial's number need nltk's instead; `docs/metrics.md` explains where the two differ. Tokenisation
here is the tutorials' usual cleaning: lowercase, delete ASCII punctuation characters, split on
whitespace (so "dog's" becomes "dogs" and "." disappears). It needs no nltk data download (no punkt).
nltk is imported on first use only, so commands that never score pay nothing for it.
"""

from __future__ import annotations

import string
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence

NLTK_BLEU_LABEL = "nltk corpus_bleu (tutorial-comparable)"
TOKENISATION = "lowercase, ASCII punctuation deleted, split on whitespace"
_DELETE_PUNCTUATION = str.maketrans("", "", string.punctuation)


def tutorial_tokens(text: str) -> list[str]:
    """The tutorials' tokens: `"A dog's ball."` -> `["a", "dogs", "ball"]`."""
    return text.lower().translate(_DELETE_PUNCTUATION).split()


def nltk_corpus_bleu(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str],
                     tokenize: Callable[[str], list[str]] = tutorial_tokens) -> dict[str, float]:
    """{"BLEU-1": ..., "BLEU-4": ...} on a 0..1 scale: nltk's `corpus_bleu` with uniform weights 1/n over
    n = 1..N and no smoothing, on `tokenize` of every caption (default: the tutorials' tokens).
    `references` maps each image id to its reference captions, `hypotheses` the same ids to one caption."""
    from nltk.translate.bleu_score import corpus_bleu

    if set(references) != set(hypotheses):
        missing, extra = set(references) - set(hypotheses), set(hypotheses) - set(references)
        raise ValueError(f"references and hypotheses must cover the same images: no hypothesis for "
                         f"{sorted(map(str, missing))[:5]}, no references for {sorted(map(str, extra))[:5]}")
    empty = [image_id for image_id, captions in references.items() if not captions]
    if empty:
        raise ValueError(f"images without references: {sorted(map(str, empty))[:5]}")
    ids = list(references)
    list_of_references = [[tokenize(caption) for caption in references[i]] for i in ids]
    tokenised_hypotheses = [tokenize(hypotheses[i]) for i in ids]
    with warnings.catch_warnings():
        # unsmoothed BLEU is 0 when an n-gram order has no match, which is the tutorials' number; nltk warns
        # about it every time, and the 0 is what we report
        warnings.filterwarnings("ignore", message=r"\s*The hypothesis contains 0 counts", category=UserWarning)
        return {f"BLEU-{n}": float(corpus_bleu(list_of_references, tokenised_hypotheses, weights=(1 / n,) * n))
                for n in range(1, 5)}
