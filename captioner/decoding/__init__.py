"""Decoding: captions from image features, through the decoder's two-method step interface.

    step       StepModel (init_state, step), Hypothesis, the length-normalised score
    rules      TokenRules: the per-step token rules every strategy applies (suppressed ids, n-gram repeats)
    beam       beam_search: THE beam search, batched; constraints (words a caption must mention) are a
               dimension of its state, plain search is the one-state case
    sampling   greedy decoding and sampling, one caption per row
    captions   decode (by strategy), decode_features: features -> Captions, with the photos' concepts
    ensemble   several decoders decoded jointly as one StepModel
    memory     the caption memory of training images (`captioner memory`)
    rerank     consensus re-ranking of beam candidates against that memory

This package's namespace holds the search itself (step, rules, beam, sampling, captions); ensembles, the
caption memory and re-ranking are imported from their modules.
"""

from captioner.decoding.beam import beam_search
from captioner.decoding.captions import Caption, choose_concepts, decode, decode_features
from captioner.decoding.rules import TokenRules
from captioner.decoding.sampling import greedy, sample
from captioner.decoding.step import Hypothesis, State, StepModel, checked_init_state, length_normalise

__all__ = ["Caption", "Hypothesis", "State", "StepModel", "TokenRules", "beam_search", "checked_init_state",
           "choose_concepts", "decode", "decode_features", "greedy", "length_normalise", "sample"]
