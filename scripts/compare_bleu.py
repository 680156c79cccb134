"""Where coco-caption's BLEU and nltk's corpus_bleu part ways, on one set of predictions.

    python scripts/compare_bleu.py RUN/predictions.json --data ../shared/data/flickr8k --split test

The predictions file is the one `captioner evaluate --out RUN` writes. Printed, ×100:
1. captioner.metrics: coco-caption's formulas and tokenisation (the headline of `captioner evaluate`);
2. nltk corpus_bleu (no smoothing) on those same tokens (captioner.text.tokenize): nltk's formula alone;
3. nltk corpus_bleu on the tutorials' tokens (captioner.metrics.nltk_bleu): the row `captioner evaluate` prints
   as "nltk corpus_bleu (tutorial-comparable)".
So 1 -> 2 is what the formulas change and 2 -> 3 what the tokenisation changes (docs/metrics.md).
Then two variants seen in tutorials that `captioner evaluate` does not report, to show what they do:
4. nltk corpus_bleu on captions split on whitespace only (Flickr8k's " ." stays a token);
5. the mean of nltk sentence_bleu over images, with SmoothingFunction().method1.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", help="predictions.json from `captioner evaluate --out`")
    parser.add_argument("--data", required=True, help="the dataset the predictions were made on")
    parser.add_argument("--images", default=None, help="image folder, when not beside the annotations")
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)

    from captioner.data import load_dataset
    from captioner.evaluation.evaluate import coco_result_id
    from captioner.metrics import compute_scores
    from captioner.metrics.nltk_bleu import NLTK_BLEU_LABEL, nltk_corpus_bleu
    from captioner.text import tokenize

    with open(args.predictions, encoding="utf-8") as handle:
        predicted = {str(row["image_id"]): row["caption"] for row in json.load(handle)}
    records = [r for r in load_dataset(args.data, images_dir=args.images).split(args.split) if str(coco_result_id(r)) in predicted]
    if len(records) != len(predicted):
        print(f"compare_bleu: {len(predicted) - len(records)} predictions name no {args.split} image of {args.data}",
              file=sys.stderr)
        return 2
    references = {r.image_id: r.captions for r in records}
    hypotheses = {r.image_id: predicted[str(coco_result_id(r))] for r in records}
    rows = {"1. coco-caption (captioner.metrics, headline)": compute_scores(references, hypotheses),
            "2. nltk corpus_bleu on coco-caption's tokens": nltk_corpus_bleu(references, hypotheses, tokenize),
            f"3. {NLTK_BLEU_LABEL}": nltk_corpus_bleu(references, hypotheses),
            "4. nltk corpus_bleu, split on whitespace only": nltk_corpus_bleu(references, hypotheses,
                                                                              lambda text: text.lower().split()),
            "5. mean nltk sentence_bleu, smoothing method1": mean_sentence_bleu(references, hypotheses)}
    print(f"{len(records)} {args.split} images; BLEU-1..4 ×100")
    for name, scores in rows.items():
        print(f"  {name:<52}" + "".join(f"{scores[f'BLEU-{n}'] * 100:8.2f}" for n in range(1, 5)))
    return 0


def mean_sentence_bleu(references: dict[str, list[str]], hypotheses: dict[str, str]) -> dict[str, float]:
    """The per-caption average many tutorials print (tutorials' tokens, smoothing method1)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    from captioner.metrics.nltk_bleu import tutorial_tokens

    smoothing = SmoothingFunction().method1
    scores = {}
    for n in range(1, 5):
        values = [sentence_bleu([tutorial_tokens(r) for r in references[i]], tutorial_tokens(hypotheses[i]),
                                weights=(1 / n,) * n, smoothing_function=smoothing) for i in references]
        scores[f"BLEU-{n}"] = sum(values) / len(values)
    return scores


if __name__ == "__main__":
    sys.exit(main())
