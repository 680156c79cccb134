"""Caption metrics: BLEU-1..4, CIDEr-D and ROUGE-L behind one interface, and object-mention F1.

Every scorer has `compute_score(references, hypotheses) -> (corpus_score, per_image)` (see
`captioner.metrics.common`); `compute_scores` runs all of them. The numbers agree with coco-caption
(pycocoevalcap) given the same tokens; see docs/metrics.md.

    common     input checks, tokenisation, n-gram counts, METRIC_NAMES
    bleu       Bleu
    cider      CiderD: one engine; document frequencies from the scored set or from a fixed corpus
    rouge      RougeL
    objects    object_mention_f1: does a caption name the COCO objects its references name (coco_objects.tsv)
    scores     compute_scores (all metrics); captions_by_image, score_captions (records + captions -> scores)
    nltk_bleu  nltk's corpus_bleu as tutorials report it, beside the headline BLEU (needs nltk)
"""

from captioner.metrics.bleu import Bleu
from captioner.metrics.cider import CiderD, CiderDReward
from captioner.metrics.common import METRIC_NAMES, Hypotheses, References
from captioner.metrics.objects import load_object_table, object_mention_f1
from captioner.metrics.rouge import RougeL
from captioner.metrics.scores import captions_by_image, compute_scores, score_captions

__all__ = ["METRIC_NAMES", "Bleu", "CiderD", "CiderDReward", "Hypotheses", "References", "RougeL",
           "captions_by_image", "compute_scores", "load_object_table", "object_mention_f1", "score_captions"]
