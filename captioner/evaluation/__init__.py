"""Evaluation: real decoding and scoring, for the trainer and for `captioner evaluate`.

    validate   what the trainer calls after every epoch: decode val features (never teacher-forced),
               score BLEU-4 and CIDEr-D; split over the ranks under torchrun. Needs only decoding and metrics.
    evaluate   `evaluate_checkpoint`: a checkpoint (or an ensemble) on a split, the report files
    report     the self-contained HTML page of the best and worst images
    coco_eval  pycocoevalcap's own scorers, beside ours (`--coco-eval`)

The package imports nothing itself, so the trainer's `captioner.evaluation.validate` brings in neither
the report nor pycocoevalcap.
"""
