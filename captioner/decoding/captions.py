"""Image features -> captions: the step every door (validation, evaluation, the API, the batch command,
the demo) decodes through.

`decode` runs `config.strategy` on a StepModel and gives token hypotheses; `decode_features` turns a
decoder's features into `Caption`s. With the ImageNet logits of the same photos (`concept_logits`, from
the CNN's own classifier: `captioner.concepts.concept_logits_for`), each photo's confident concepts that
the vocabulary can say are chosen (`DecodeConfig.concept_threshold`, `max_constraints`), beam search is
made to mention them (its constraint states, `captioner.decoding.beam`), and every caption carries them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from captioner.concepts import Concept, ConceptDetector, concept_token_ids, constraint_concepts
from captioner.config import DecodeConfig
from captioner.decoding.beam import beam_search
from captioner.decoding.sampling import greedy, sample
from captioner.decoding.step import Hypothesis, StepModel
from captioner.model import CaptionDecoder
from captioner.text import Vocabulary

if TYPE_CHECKING:
    from captioner.decoding.rerank import ConsensusReranker


def decode(model: StepModel, image_features: Tensor, config: DecodeConfig, start_id: int, end_id: int,
           suppress_ids: Sequence[int] = (), generator: torch.Generator | None = None
           ) -> list[list[Hypothesis]]:
    """Caption every image with `config.strategy`; for each image, `config.n_best` hypotheses best first.

    Beam search returns fewer for an image only when fewer captions with a finite log-prob exist (a toy
    vocabulary, or the token rules leaving nothing to emit).
    """
    if config.strategy == "greedy":
        return greedy(model, image_features, config, start_id, end_id, suppress_ids)
    if config.strategy == "sample":
        return sample(model, image_features, config, start_id, end_id, suppress_ids, generator)
    return beam_search(model, image_features, config, start_id, end_id, suppress_ids)


@dataclass
class Caption:
    text: str
    log_prob: float
    score: float
    finished: bool
    consensus: float | None = None  # set by consensus re-ranking: mean CIDEr-D against the neighbours' captions
    # The photo's confident concepts the vocabulary can say (best first, at most max_constraints). Beam
    # search was made to mention them; greedy decoding and sampling only report them.
    concepts: list[Concept] = field(default_factory=list)
    # True: the caption mentions every concept (constrained beam search); False: no caption that does was
    # found, this is the plain beam search's; None: not constrained (no concepts, or not beam search).
    constraints_met: bool | None = None


def choose_concepts(vocab: Vocabulary, concept_logits: Tensor, config: DecodeConfig) -> list[list[Concept]]:
    """For each row of ImageNet logits (N, 1000), the concepts its caption should mention (see `Caption`);
    empty lists when concepts are off (`config.concept_threshold` None)."""
    if config.concept_threshold is None:
        return [[] for _ in range(concept_logits.size(0))]
    detected = ConceptDetector(threshold=config.concept_threshold, top_k=0)(concept_logits)
    return [constraint_concepts(concepts, config.max_constraints, vocab.index) for concepts in detected]


def decode_features(model: CaptionDecoder, vocab: Vocabulary, features: Tensor, config: DecodeConfig,
                    batch_size: int = 250, generator: torch.Generator | None = None,
                    reranker: ConsensusReranker | None = None,
                    concept_logits: Tensor | None = None) -> list[list[Caption]]:
    """Caption every row of `features` (N, D); returns n-best Captions per row, best first.

    With a `reranker` (beam search only), the beam writes `reranker.config.candidates` captions per image
    and they come back in consensus order (`captioner.decoding.rerank`), `config.n_best` of them; with
    concepts, every candidate mentions them (when it can), so re-ranking chooses among captions that name
    them. `concept_logits`: the photos' ImageNet logits (N, 1000), rows as `features`; None, or
    `config.concept_threshold` None, decodes without concepts, exactly as plain decoding does."""
    if concept_logits is not None and concept_logits.size(0) != features.size(0):
        raise ValueError(f"concept_logits has {concept_logits.size(0)} rows for {features.size(0)} images")
    if reranker is not None:
        candidates = decode_features(model, vocab, features, reranker.config.decode_config(config), batch_size,
                                     concept_logits=concept_logits)
        return reranker.rerank(features, candidates, config.n_best)
    concepts = (None if concept_logits is None or config.concept_threshold is None
                else choose_concepts(vocab, concept_logits, config))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if generator is None and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    suppress = (vocab.pad_id, vocab.start_id, vocab.unk_id)
    results: list[list[Caption]] = []
    try:
        for start in range(0, features.size(0), batch_size):
            chunk = features[start:start + batch_size].to(device=device, dtype=torch.float32)
            chunk_concepts = [[]] * chunk.size(0) if concepts is None else concepts[start:start + batch_size]
            if config.strategy == "beam" and any(chunk_concepts):
                constraints = [[concept_token_ids(c.word, vocab.index) for c in image_concepts]
                               for image_concepts in chunk_concepts]
                hypotheses = beam_search(model, chunk, config, vocab.start_id, vocab.end_id, suppress_ids=suppress,
                                         constraints=constraints)
            else:
                hypotheses = decode(model, chunk, config, vocab.start_id, vocab.end_id, suppress_ids=suppress,
                                    generator=generator)
            for image_hypotheses, image_concepts in zip(hypotheses, chunk_concepts, strict=True):
                results.append([
                    Caption(" ".join(vocab.decode(h.tokens)), h.log_prob, h.score, h.finished,
                            concepts=list(image_concepts), constraints_met=h.constraints_met)
                    for h in image_hypotheses])
    finally:
        model.train(was_training)
    return results
