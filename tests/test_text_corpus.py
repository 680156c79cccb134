"""Captions without photos: reading a corpus, pseudo image vectors, warm start, and training with both."""

import json

import pytest
import torch
from helpers import random_caption_records

from captioner.concepts import load_concept_map
from captioner.config import DecodeConfig, ModelConfig, TrainConfig
from captioner.data.records import DataFormatError
from captioner.model import CaptionDecoder
from captioner.text import Vocabulary
from captioner.train import LOG, train
from captioner.train.text_corpus import PseudoVectors, read_text_corpus, text_only_examples
from captioner.train.warm_start import warm_start


def test_read_text_corpus_json_folder_and_lines(tmp_path):
    data = {"info": {}, "captions": [{"coco_id": 1, "caption": " A zebra in a field. ", "source": "x"},
                                     {"coco_id": 2, "caption": "Two cats on a bed", "source": "x"}]}
    (tmp_path / "coco_captions_text.json").write_text(json.dumps(data))
    assert read_text_corpus(tmp_path) == ["A zebra in a field.", "Two cats on a bed"]
    assert read_text_corpus(tmp_path / "coco_captions_text.json") == ["A zebra in a field.", "Two cats on a bed"]
    lines = tmp_path / "captions.txt"
    lines.write_text("a dog\n\n a cat \n")
    assert read_text_corpus(lines) == ["a dog", "a cat"]


def test_read_text_corpus_names_the_bad_entry(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"captions": [{"caption": "fine"}, {"text": "no caption key"}]}))
    with pytest.raises(DataFormatError, match=r"captions\[1\]"):
        read_text_corpus(path)
    with pytest.raises(FileNotFoundError, match="no such text corpus"):
        read_text_corpus(tmp_path / "missing")


def synthetic_head(dim=32, seed=0):
    """A random 1000-class head and mean feature: the pseudo-vector rules do not depend on ImageNet's weights."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1000, dim, generator=generator) * 0.3, torch.zeros(1000), torch.randn(dim, generator=generator)


@pytest.mark.parametrize("target_p", [0.3, 0.6, 0.9])
def test_pseudo_vector_makes_the_classifier_give_the_concept_target_p(target_p):
    weight, bias, mean = synthetic_head()
    concept_map = load_concept_map()
    pseudo = PseudoVectors(weight, bias, mean, concept_map, target_p)
    for word in ("zebra", "cat", "dog", "airplane"):
        p = pseudo.probability(pseudo.vector([word]), concept_map.classes_of(word))
        assert p == pytest.approx(target_p, abs=1e-3), word
        assert pseudo.probability(mean, concept_map.classes_of(word)) < target_p


def test_concepts_named_uses_every_form_once_in_order():
    weight, bias, mean = synthetic_head()
    pseudo = PseudoVectors(weight, bias, mean, load_concept_map())
    assert pseudo.concepts_named("two zebras and a zebra near some planes".split()) == ["zebra", "airplane"]
    assert pseudo.concepts_named("a man walks down the road".split()) == []


def test_text_only_examples_keep_captions_that_name_a_concept():
    weight, bias, mean = synthetic_head()
    pseudo = PseudoVectors(weight, bias, mean, load_concept_map())
    captions = ["A zebra grazing.", "A man walks.", "Two cats near a dog and a zebra and a plane."]
    records, features, used = text_only_examples(captions, pseudo, max_concepts=2)
    assert [r.captions for r in records] == [["A zebra grazing."], ["Two cats near a dog and a zebra and a plane."]]
    assert {r.split for r in records} == {"train"}
    assert features.shape == (2, 32)
    assert torch.allclose(features[0], pseudo.vector(["zebra"]))
    assert torch.allclose(features[1], pseudo.vector(["cat", "dog"]))  # the first two concepts named
    assert used == {"zebra": 1, "cat": 1, "dog": 1}


def tiny_decoder(vocab_size, seed):
    torch.manual_seed(seed)
    return CaptionDecoder(ModelConfig(vocab_size=vocab_size, feature_dim=16, embed_dim=8, hidden_dim=12,
                                      image_dim=8, dropout=0.0))


def test_warm_start_copies_known_words_and_makes_new_words_rare():
    old_vocab = Vocabulary.build([["a", "dog", "runs"]] * 5)
    new_vocab = Vocabulary.build([["a", "zebra", "runs", "dog"]] * 5)
    source, model = tiny_decoder(len(old_vocab), 0), tiny_decoder(len(new_vocab), 1)
    kept = warm_start(model, new_vocab, source, old_vocab)
    assert kept == len(old_vocab)
    for word in old_vocab.words:
        i, j = new_vocab.index[word], old_vocab.index[word]
        assert torch.equal(model.embed.weight[i], source.embed.weight[j])
        assert torch.equal(model.output.weight[i], source.output.weight[j])
        assert model.output.bias[i] == source.output.bias[j]
    zebra = new_vocab.index["zebra"]
    assert torch.count_nonzero(model.output.weight[zebra]) == 0
    assert model.output.bias[zebra] <= torch.quantile(source.output.bias, 0.05) + 1e-6
    assert torch.equal(model.lstm.weight_hh_l0, source.lstm.weight_hh_l0)
    assert torch.equal(model.image_proj.weight, source.image_proj.weight)


def test_warm_start_refuses_another_shape():
    vocab = Vocabulary.build([["a", "dog"]] * 5)
    other = CaptionDecoder(ModelConfig(vocab_size=len(vocab), feature_dim=16, embed_dim=8, hidden_dim=10,
                                       image_dim=8, dropout=0.0))
    with pytest.raises(ValueError, match="same decoder shape"):
        warm_start(tiny_decoder(len(vocab), 0), vocab, other, vocab)


@pytest.mark.slow
def test_training_from_a_checkpoint_grows_its_vocabulary_and_keeps_its_cnn(tmp_path):
    """A warm-started run: the new word is learnt, the initial decoder's CNN entry is passed on, and the
    first validation already scores like the initial checkpoint (its weights were copied, not re-drawn)."""
    from captioner.checkpoint import load_checkpoint

    train_records, train_features = random_caption_records(48, "train", 0)
    val_records, val_features = random_caption_records(8, "val", 1)
    config = TrainConfig(epochs=4, batch_size=16, lr=5e-3, warmup_steps=2, min_word_count=1, patience=10, seed=3,
                         val_decode=DecodeConfig(strategy="beam", beam_size=2, max_length=8))
    model = ModelConfig(embed_dim=16, hidden_dim=24, image_dim=16, dropout=0.0)
    first = train(train_records, train_features, val_records, val_features, tmp_path / "first", model, config,
                  encoder={"encoder": "test", "weights_hash": "abc"}, progress=False)
    extra, extra_features = random_caption_records(16, "train", 5)
    for record in extra:
        record.captions = [c.replace("dog", "zebra") for c in record.captions]
    second = train(train_records + extra, torch.cat([train_features, extra_features]), val_records, val_features,
                   tmp_path / "second", None, TrainConfig(**{**config.__dict__, "epochs": 1, "lr": 1e-6}),
                   encoder={"encoder": "test", "weights_hash": "abc"}, progress=False, init_checkpoint=first)
    grown = load_checkpoint(second)
    assert "zebra" in grown.vocab.index and len(grown.vocab) == len(load_checkpoint(first).vocab) + 1
    assert grown.encoder["weights_hash"] == "abc"
    log = [json.loads(line) for line in (tmp_path / "first" / LOG).read_text().splitlines()]
    best_before = max(entry["val"]["CIDEr-D"] for entry in log)
    after = json.loads((tmp_path / "second" / LOG).read_text().splitlines()[0])["val"]["CIDEr-D"]
    assert after == pytest.approx(best_before, abs=0.05)


@pytest.mark.slow
def test_warm_start_refuses_features_of_another_cnn(tmp_path):
    train_records, train_features = random_caption_records(16, "train", 0)
    config = TrainConfig(epochs=1, batch_size=16, min_word_count=1, seed=3,
                         val_decode=DecodeConfig(strategy="beam", beam_size=2, max_length=8))
    model = ModelConfig(embed_dim=16, hidden_dim=24, image_dim=16, dropout=0.0)
    first = train(train_records, train_features, train_records[:4], train_features[:4], tmp_path / "first", model,
                  config, encoder={"encoder": "test", "weights_hash": "abc"}, progress=False)
    with pytest.raises(ValueError, match="feature cache was made with test \\(weights hash def\\)"):
        train(train_records, train_features, train_records[:4], train_features[:4], tmp_path / "second", None,
              config, encoder={"encoder": "test", "weights_hash": "def"}, progress=False, init_checkpoint=first)


@pytest.mark.slow
def test_a_warm_started_run_resumes_and_refuses_to_resume_without_its_checkpoint(tmp_path):
    from captioner.checkpoint import CheckpointError

    train_records, train_features = random_caption_records(32, "train", 0)
    val = (train_records[:4], train_features[:4])
    config = TrainConfig(epochs=2, batch_size=16, lr=5e-3, warmup_steps=2, min_word_count=1, patience=10, seed=3,
                         val_decode=DecodeConfig(strategy="beam", beam_size=2, max_length=8))
    model = ModelConfig(embed_dim=16, hidden_dim=24, image_dim=16, dropout=0.0)
    encoder = {"encoder": "test", "weights_hash": "abc"}
    first = train(train_records, train_features, *val, tmp_path / "first", model, config, encoder=encoder,
                  progress=False)

    def stop(entry):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(train_records, train_features, *val, tmp_path / "warm", None, config, encoder=encoder, progress=False,
              init_checkpoint=first, on_epoch_end=stop)
    with pytest.raises(CheckpointError, match="init_checkpoint"):
        train(train_records, train_features, *val, tmp_path / "warm", model, config, encoder=encoder,
              progress=False, resume=True)
    train(train_records, train_features, *val, tmp_path / "warm", None, config, encoder=encoder, progress=False,
          init_checkpoint=first, resume=True)
    log = [json.loads(line) for line in (tmp_path / "warm" / LOG).read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [1, 2]
