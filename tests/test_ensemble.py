"""Joint decoding of several checkpoints (captioner.decoding.ensemble) and `captioner evaluate` with an ensemble."""

import json
import math

import pytest
import torch

from captioner.checkpoint import CheckpointError, save_checkpoint
from captioner.config import DecodeConfig, ModelConfig
from captioner.decoding import decode
from captioner.decoding.ensemble import EnsembleDecoder, load_ensemble
from captioner.model import CaptionDecoder
from captioner.text import Vocabulary

VOCAB = Vocabulary.build([["a", "dog", "runs"], ["a", "cat", "sits"]], min_count=1)


def decoder(seed: int, feature_dim: int = 6) -> CaptionDecoder:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=len(VOCAB), feature_dim=feature_dim, embed_dim=8, hidden_dim=8, image_dim=8)
    return CaptionDecoder(config).eval()


def test_members_probabilities_are_averaged_step_by_step() -> None:
    first, second = decoder(0, feature_dim=6), decoder(1, feature_dim=4)
    ensemble = EnsembleDecoder([first, second]).eval()
    features = torch.randn(3, 10)
    tokens = torch.tensor([VOCAB.start_id] * 3)
    with torch.no_grad():
        mixed, state = ensemble.step(tokens, ensemble.init_state(features))
        a, _ = first.step(tokens, first.init_state(features[:, :6]))
        b, _ = second.step(tokens, second.init_state(features[:, 6:]))
    assert torch.allclose(mixed, torch.log((a.exp() + b.exp()) / 2), atol=1e-6)
    assert torch.allclose(mixed.exp().sum(dim=1), torch.ones(3), atol=1e-5)  # still a distribution
    assert len(state) == 6  # both members' (h, c, image term)


@pytest.mark.slow
def test_an_ensemble_of_copies_decodes_like_the_model() -> None:
    model = decoder(2)
    ensemble = EnsembleDecoder([model, model])
    features = torch.randn(4, 6)
    config = DecodeConfig(strategy="beam", beam_size=3, n_best=3, max_length=8)
    alone = decode(model, features, config, VOCAB.start_id, VOCAB.end_id)
    joint = decode(ensemble, torch.cat([features, features], dim=1), config, VOCAB.start_id, VOCAB.end_id)
    for one, two in zip(alone, joint, strict=True):
        assert [h.tokens for h in one] == [h.tokens for h in two]
        assert all(math.isclose(x.log_prob, y.log_prob, abs_tol=1e-4) for x, y in zip(one, two, strict=True))


def test_feature_width_and_vocabulary_are_checked(tmp_path) -> None:
    ensemble = EnsembleDecoder([decoder(0), decoder(1, feature_dim=4)])
    with pytest.raises(ValueError, match="6\\+4 = 10"):
        ensemble.init_state(torch.randn(2, 6))
    save_checkpoint(tmp_path / "a.safetensors", decoder(0), VOCAB, {"encoder": "efficientnet_lite0"})
    other = Vocabulary.build([["a", "dog", "runs"], ["a", "cat", "naps"]], min_count=1)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "b.safetensors", CaptionDecoder(ModelConfig(vocab_size=len(other), feature_dim=6,
                    embed_dim=8, hidden_dim=8, image_dim=8)), other, {"encoder": "efficientnet_lite0"})
    with pytest.raises(CheckpointError, match="vocabulary differs"):
        load_ensemble([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])


@pytest.mark.slow
@pytest.mark.shared_data
def test_evaluate_an_ensemble_of_two_checkpoints(tiny_run, tmp_path, capsys) -> None:
    from captioner.apps.cli import main

    common = ["--data", str(tiny_run["data"]), "--images", str(tiny_run["images"]), "--split", "val",
              "--features", str(tiny_run["features"]), "--beam-size", "2", "--no-html"]
    checkpoint = str(tiny_run["checkpoint"])
    assert main(["evaluate", "--checkpoint", checkpoint, "--out", str(tmp_path / "one"), *common]) == 0
    assert main(["evaluate", "--checkpoint", checkpoint, checkpoint, "--out", str(tmp_path / "two"), *common]) == 0
    assert "ensemble of 2 checkpoints" in capsys.readouterr().out
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert len(two["ensemble"]) == 2 and "ensemble" not in one
    # A checkpoint ensembled with itself mixes two equal distributions: the same captions, the same scores.
    assert json.loads((tmp_path / "one" / "predictions.json").read_text()) == \
        json.loads((tmp_path / "two" / "predictions.json").read_text())
    assert one["scores"] == pytest.approx(two["scores"])
