"""pycocoevalcap's own scorers (`captioner evaluate --coco-eval`): its PTB tokenizer, BLEU, METEOR, ROUGE-L and
CIDEr, beside captioner.metrics. Imported only when asked for: it needs the pycocoevalcap package and Java.
"""

from __future__ import annotations

import shutil
from typing import Any


def run_coco_eval(references: dict[str, list[str]], hypotheses: dict[str, str]) -> dict[str, Any]:
    """pycocoevalcap's own scorers with its PTB tokenizer and METEOR; both need Java."""
    missing = []
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        missing.append("the pycocoevalcap package (pip install pycocoevalcap)")
    if shutil.which("java") is None:
        missing.append("Java (its PTB tokenizer and METEOR run on the JVM)")
    if missing:
        message = "--coco-eval skipped: missing " + " and ".join(missing)
        print(message)
        return {"skipped": message}
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": hypotheses[i]}] for i in references})
    results: dict[str, float] = {}
    for scorer, names in ((Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Meteor(), ["METEOR"]),
                          (Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])):
        score, _ = scorer.compute_score(gts, res)
        for name, value in zip(names, score if isinstance(score, list) else [score], strict=True):
            results[name] = float(value)
    print("COCOEvalCap: " + "  ".join(f"{k} {v * 100:.1f}" for k, v in results.items()))
    return results
