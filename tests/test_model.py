"""The decoder: step() agrees with forward(), padding costs nothing, and it can learn."""

import pytest
import torch
from helpers import decoder_batch

from captioner.config import DecodeConfig, ModelConfig
from captioner.decoding import decode_features
from captioner.model import CaptionDecoder
from captioner.text import Vocabulary


@pytest.mark.slow
@pytest.mark.parametrize("image_input", ["every", "first"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_step_matches_forward(image_input, num_layers):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=40, feature_dim=16, embed_dim=8, hidden_dim=12, image_dim=8,
                         num_layers=num_layers, image_input=image_input)
    model = CaptionDecoder(config).eval()
    features, captions, lengths = decoder_batch()
    lstm_logits, _ = model(features, captions, lengths)

    # step-by-step decoding over the same teacher-forced inputs gives the same distributions
    log_probs = torch.log_softmax(lstm_logits, dim=-1)
    state, offset = model.init_state(features), 0
    for t in range(int(lengths.max()) - 1):
        step_log_probs, state = model.step(captions[:, t], state)
        live = int((lengths - 1 > t).sum())
        assert torch.allclose(step_log_probs[:live], log_probs[offset:offset + live], atol=1e-5)
        offset += live
    assert offset == log_probs.size(0)


def test_padding_is_not_scored():
    config = ModelConfig(vocab_size=40, feature_dim=16, embed_dim=8, hidden_dim=12, image_dim=8)
    features, captions, lengths = decoder_batch()
    logits, targets = CaptionDecoder(config).eval()(features, captions, lengths)
    assert logits.size(0) == int((lengths - 1).sum())
    assert (targets != 0).all()


def test_image_term_changes_the_prediction():
    config = ModelConfig(vocab_size=40, feature_dim=16, embed_dim=8, hidden_dim=12, image_dim=8)
    model = CaptionDecoder(config).eval()
    features, captions, lengths = decoder_batch()
    with torch.no_grad():
        a, _ = model(features, captions, lengths)
        b, _ = model(features * 0, captions, lengths)
    assert not torch.allclose(a, b)


@pytest.mark.slow
def test_tiny_model_overfits_and_greedy_decodes_captions_back():
    torch.manual_seed(0)
    sentences = [["a", "dog", "runs", "on", "the", "grass"], ["two", "children", "play", "in", "the", "snow"],
                 ["a", "man", "rides", "a", "red", "bike"], ["the", "cat", "sleeps"]]
    vocab = Vocabulary.build(sentences, min_count=1)
    features = torch.randn(len(sentences), 16)
    encoded = [vocab.encode(s) for s in sentences]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    lengths = torch.tensor([len(encoded[i]) for i in order])
    captions = torch.zeros(len(order), int(lengths.max()), dtype=torch.long)
    for row, i in enumerate(order):
        captions[row, :len(encoded[i])] = torch.tensor(encoded[i])
    config = ModelConfig(vocab_size=len(vocab), feature_dim=16, embed_dim=32, hidden_dim=64, image_dim=32, dropout=0.0)
    model = CaptionDecoder(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        logits, targets = model(features[order], captions, lengths)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    for strategy in ("greedy", "beam"):
        decoded = decode_features(model, vocab, features, DecodeConfig(strategy=strategy, beam_size=3))
        assert [c[0].text for c in decoded] == [" ".join(s) for s in sentences]


@pytest.mark.slow
@pytest.mark.parametrize("image_input", ["every", "first"])
def test_inference_step_looks_up_word_gates_and_follows_weight_changes(image_input):
    """Without gradients, `step` reads the word term from a cached table; it gives the product's result,
    and the table follows in-place updates (an optimizer step) and loaded weights."""
    config = ModelConfig(vocab_size=30, feature_dim=16, embed_dim=12, hidden_dim=20, image_dim=12, dropout=0.3,
                         image_input=image_input)
    torch.manual_seed(0)
    model = CaptionDecoder(config).eval()
    features, tokens = torch.randn(4, 16), torch.tensor([1, 5, 7, 29])

    def both_paths():
        with torch.enable_grad():  # grad mode: the plain product
            expected, _ = model.step(tokens, model.init_state(features))
        with torch.inference_mode():
            looked_up, _ = model.step(tokens, model.init_state(features))
        torch.testing.assert_close(looked_up, expected.detach(), atol=1e-6, rtol=1e-5)
        return looked_up

    before = both_paths()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    logits, targets = model(features, torch.randint(0, 30, (4, 6)), torch.tensor([6, 5, 4, 3]))
    torch.nn.functional.cross_entropy(logits, targets).backward()
    optimizer.step()
    model.eval()
    after_step = both_paths()
    assert not torch.allclose(before, after_step)
    torch.manual_seed(1)
    model.load_state_dict(CaptionDecoder(config).state_dict())
    assert not torch.allclose(after_step, both_paths())
