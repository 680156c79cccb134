"""Training that starts from a trained checkpoint: checking the features fit it, and growing its vocabulary.

`warm_start` starts a decoder from a trained one whose vocabulary is smaller (e.g. Flickr8k's, before
COCO text).
Every weight that does not depend on the vocabulary (image projection, LSTM) is copied. The rows of the
word embedding and of the output layer are copied word by word for the words both vocabularies have; a
new word keeps its fresh random embedding, and its output row gets zero weights and the bias of the
rarest known words, so that before it is trained it is about as likely as a rare word, not (as a fresh
bias near 0 would make it) more likely than most of the trained vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch

from captioner.checkpoint import Checkpoint
from captioner.encoders.identity import check_same_cnn
from captioner.model import CaptionDecoder
from captioner.text import Vocabulary

VOCABULARY_ROWS = ("embed.weight", "output.weight", "output.bias")
RARE_BIAS_QUANTILE = 0.05


def warm_start(model: CaptionDecoder, vocab: Vocabulary, source: CaptionDecoder, source_vocab: Vocabulary) -> int:
    """Copy `source`'s weights into `model` (same shape except the vocabulary); returns how many of
    `vocab`'s words had a row in `source_vocab`."""
    target_state, source_state = model.state_dict(), source.state_dict()
    if set(target_state) != set(source_state):
        raise ValueError("warm start: the two decoders have different layers "
                         f"({sorted(set(target_state) ^ set(source_state))[:4]})")
    for name, tensor in source_state.items():
        if name in VOCABULARY_ROWS:
            continue
        if tensor.shape != target_state[name].shape:
            raise ValueError(f"warm start: {name} is {tuple(tensor.shape)} in the initial decoder, "
                             f"{tuple(target_state[name].shape)} in the new one; give the same decoder shape")
        target_state[name] = tensor.clone()
    shared = [(i, source_vocab.index[w]) for i, w in enumerate(vocab.words) if w in source_vocab.index]
    new_rows = torch.tensor([i for i, w in enumerate(vocab.words) if w not in source_vocab.index], dtype=torch.long)
    to_rows = torch.tensor([i for i, _ in shared], dtype=torch.long)
    from_rows = torch.tensor([j for _, j in shared], dtype=torch.long)
    for name in VOCABULARY_ROWS:
        target_state[name] = target_state[name].clone()
        target_state[name][to_rows] = source_state[name][from_rows]
    if len(new_rows):
        rare_bias = torch.quantile(source_state["output.bias"].float(), RARE_BIAS_QUANTILE)
        target_state["output.weight"][new_rows] = 0.0
        target_state["output.bias"][new_rows] = rare_bias.to(target_state["output.bias"].dtype)
    model.load_state_dict(target_state)
    return len(shared)


def check_features_encoder(initial: Checkpoint, features_encoder: dict[str, Any], feature_dim: int) -> None:
    """The training features must come from the CNN the initial checkpoint was trained with."""
    if feature_dim != initial.model.config.feature_dim:
        raise ValueError(f"{initial.path}: the decoder expects {initial.model.config.feature_dim}-dim image "
                         f"features, but the training features have {feature_dim}; use the feature cache of "
                         "the encoder the checkpoint was trained with")
    check_same_cnn(features_encoder, initial.encoder, str(initial.path), "the feature cache was made with",
                   "the checkpoint was trained on", f"make a cache with `captioner features --checkpoint {initial.path}`")
