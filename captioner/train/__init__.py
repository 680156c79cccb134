"""Training: one loop (`Trainer`) and the ways to train as its objectives.

  trainer.py          the loop: run folder, resume, best/last, log, curves, early stopping, EMA, AMP, DDP
  state.py            the run folder's files and the training state saved in last.safetensors
  data.py             captions as tensors, cached features per split, the seeded epoch order
  schedule.py         learning-rate schedules, the weight average
  teacher_forcing.py  cross-entropy on cached features (`captioner train`, --objective xe): a new decoder, or
                      one warm-started from a trained checkpoint (`warm_start.py`), with `text_corpus.py`
  scst.py             self-critical sequence training from a trained checkpoint (--objective scst)
  finetuning.py       the CNN and the decoder together, on images (--objective finetune)

A new way to train is an init source, a parameter set and a loss (an `Objective`), not a new loop; where a
run starts is the objective's `init_from`, which the trainer loads.
"""

from captioner.config import FinetuneConfig, ScstConfig, TrainConfig
from captioner.train.data import CaptionTensors, cached_splits, encode_split, epoch_order, split_with_features
from captioner.train.finetuning import CnnFinetuning, finetune
from captioner.train.schedule import WeightAverage, learning_rate, warmup_cosine
from captioner.train.scst import SelfCritical, train_scst
from captioner.train.state import BEST, CURVES, LAST, LOG
from captioner.train.teacher_forcing import TeacherForcing, train, train_on_cache
from captioner.train.trainer import Objective, Trainer, autocast_dtype, cpu_bf16_lstm_supported

__all__ = [
    "BEST",
    "CURVES",
    "LAST",
    "LOG",
    "CaptionTensors",
    "CnnFinetuning",
    "FinetuneConfig",
    "Objective",
    "ScstConfig",
    "SelfCritical",
    "TeacherForcing",
    "TrainConfig",
    "Trainer",
    "WeightAverage",
    "autocast_dtype",
    "cpu_bf16_lstm_supported",
    "cached_splits",
    "encode_split",
    "epoch_order",
    "finetune",
    "learning_rate",
    "split_with_features",
    "train",
    "train_on_cache",
    "train_scst",
    "warmup_cosine",
]
