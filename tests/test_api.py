"""The public API with concepts: `Captioner.caption` names what the CNN's classifier recognises, and
`concept_threshold=None` gives plain captions. The checkpoint is conftest's `toy_checkpoint` (its vocabulary
says "cat"; the CNN is the real EfficientNet-Lite0, which recognises the example cat)."""

from __future__ import annotations

import pytest
from helpers import REPO_ROOT

CAT = REPO_ROOT / "demo" / "examples" / "cat.jpg"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def captioner(toy_checkpoint, one_torch_thread):
    from captioner.api import Captioner

    return Captioner.from_pretrained(toy_checkpoint, device="cpu")


def test_default_captions_name_the_recognised_concept(captioner):
    result = captioner.caption(CAT, n_best=2)[0]
    assert [c.word for c in result.concepts] == ["cat"] and result.concepts[0].p >= 0.3
    assert all("cat" in c.text.split() and c.constraints_met is True and c.concepts == result.concepts
               for c in result.captions)


def test_concepts_off_gives_the_plain_captions(captioner):
    from captioner.config import DecodeConfig
    from captioner.decoding import decode_features
    from captioner.features import encode_images

    result = captioner.caption(CAT, n_best=2, concept_threshold=None)[0]
    assert result.concepts == [] and all(c.constraints_met is None for c in result.captions)
    features = encode_images([captioner.load_image(CAT)], captioner.encoder).features
    plain = decode_features(captioner.checkpoint.model, captioner.vocab, features, DecodeConfig(n_best=2))[0]
    assert [c.text for c in result.captions] == [c.text for c in plain]
    assert "cat" not in plain[0].text.split()  # so the default caption's "cat" comes from the concept


def test_greedy_reports_concepts_without_forcing_them(captioner):
    with_concepts = captioner.caption(CAT, strategy="greedy")[0]
    plain = captioner.caption(CAT, strategy="greedy", concept_threshold=None)[0]
    assert with_concepts.caption == plain.caption
    assert [c.word for c in with_concepts.concepts] == ["cat"] and with_concepts.captions[0].constraints_met is None
