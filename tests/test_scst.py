"""Self-critical training: the fixed-df CIDEr-D reward, sampling with gradients, baselines, learning, resume."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from captioner.checkpoint import load_checkpoint, read_raw, save_checkpoint
from captioner.config import DecodeConfig, ModelConfig
from captioner.data.records import CaptionRecord
from captioner.decoding import beam_search
from captioner.metrics import CiderD, CiderDReward
from captioner.model import CaptionDecoder
from captioner.text import Vocabulary, tokenize
from captioner.train import BEST, CURVES, LAST, LOG, ScstConfig, SelfCritical, Trainer, encode_split
from captioner.train.scst import (
    advantages,
    beam_candidates,
    caption_log_probs,
    caption_words,
    draw,
    mean_reward,
    reference_tokens,
    sample_captions,
    set_dropout,
    train_scst,
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ the reward

def _random_corpus(images: int, seed: int) -> tuple[list[list[list[str]]], list[list[str]]]:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(40)]
    refs = [[rng.choices(words, k=rng.randint(3, 12)) for _ in range(rng.randint(1, 5))] for _ in range(images)]
    hyps = []
    for i, image_refs in enumerate(refs):
        kind = i % 5
        if kind == 0:
            hyps.append(list(image_refs[0]))  # a copy of a reference
        elif kind == 1:
            hyps.append([])  # empty
        elif kind == 2:
            hyps.append(rng.choices(words, k=rng.randint(2, 14)))  # random words
        elif kind == 3:
            hyps.append([*image_refs[-1][:4], "unseen", "words", *image_refs[0]])  # n-grams no reference has
        else:
            hyps.append(list(refs[(i + 1) % images][0]))  # another image's reference
    return refs, hyps


def test_reward_equals_ciderd_when_df_comes_from_the_scored_set():
    refs, hyps = _random_corpus(60, seed=1)
    _, expected = CiderD().compute_score({i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)},
                                         {i: " ".join(h) for i, h in enumerate(hyps)}, tokenized=True)
    scorer = CiderDReward(refs)
    expected_array = np.array([expected[i] for i in range(len(refs))])
    assert scorer.score(hyps, refs) == pytest.approx(expected_array, abs=1e-10)
    assert scorer.score_images(hyps, list(range(len(refs)))) == pytest.approx(expected_array, abs=1e-10)
    assert expected_array.max() > 1.0  # the case is not trivially all zeros


def test_reward_df_is_fixed_by_the_corpus_not_by_the_batch():
    refs, hyps = _random_corpus(60, seed=2)
    scorer = CiderDReward(refs)
    everything = scorer.score_images(hyps, list(range(60)))
    # Scored in small batches, in another order, several hypotheses per image: the same numbers.
    order = list(range(59, -1, -1))
    pieces = [scorer.score_images([hyps[i] for i in order[s:s + 7]], order[s:s + 7]) for s in range(0, 60, 7)]
    assert np.concatenate(pieces) == pytest.approx(everything[order], abs=1e-12)
    repeated = scorer.score_images([hyps[3]] * 5, [3] * 5)
    assert repeated == pytest.approx([everything[3]] * 5, abs=1e-12)
    # CiderD over a subset counts df over that subset only, so it disagrees.
    subset = {i: [" ".join(r) for r in refs[i]] for i in range(5)}
    _, local = CiderD().compute_score(subset, {i: " ".join(hyps[i]) for i in range(5)}, tokenized=True)
    assert any(abs(local[i] - everything[i]) > 1e-3 for i in range(5))


def test_reward_against_references_outside_the_corpus():
    scorer = CiderDReward([[["a", "dog"]], [["a", "cat"]]])
    # Every n-gram is new to the corpus (df 0, idf log 2) and the hypothesis copies the only reference.
    sentence = ["two", "birds", "sing", "in", "trees"]
    assert scorer.score([sentence], [[sentence]]) == pytest.approx([10.0])
    assert scorer.score([["no", "match"]], [[sentence]]) == pytest.approx([0.0])
    with pytest.raises(ValueError, match="one reference list per hypothesis"):
        scorer.score([sentence], [])


@pytest.mark.slow
def test_reward_scores_many_hypotheses_by_image_index():
    """5,000 hypotheses against 1,000 corpus images (the speed is scripts/bench/scoring.py's): scoring by
    corpus index gives what scoring against the same references passed in gives."""
    refs, _ = _random_corpus(1000, seed=3)
    scorer = CiderDReward(refs)
    rng = random.Random(0)
    hyps = [rng.choice(refs[i // 5])[: rng.randint(1, 12)] for i in range(5000)]
    scores = scorer.score_images(hyps, [i // 5 for i in range(5000)])
    assert scores.shape == (5000,) and (scores > 0).mean() > 0.5
    sample = range(0, 5000, 97)
    assert scores[list(sample)] == pytest.approx(scorer.score([hyps[i] for i in sample],
                                                              [refs[i // 5] for i in sample]), abs=1e-9)


@pytest.mark.slow
@pytest.mark.shared_data
def test_reward_equals_ciderd_on_flickr8k_references(flickr8k_dir):
    """The same check on real captions (CiderD itself is checked against pycocoevalcap in test_metrics)."""
    data = json.loads((flickr8k_dir / "dataset_flickr8k.json").read_text())
    references = [[s["raw"] for s in image["sentences"]] for image in data["images"] if image["split"] == "test"]
    references = references[:300]
    hypotheses = [refs[0] if i % 3 == 0 else references[(i + 5) % 300][1] if i % 3 == 1 else refs[2][:25]
                  for i, refs in enumerate(references)]
    _, expected = CiderD().compute_score(dict(enumerate(references)), dict(enumerate(hypotheses)))
    scorer = CiderDReward([[tokenize(r) for r in refs] for refs in references])
    ours = scorer.score_images([tokenize(h) for h in hypotheses], list(range(300)))
    assert ours == pytest.approx([expected[i] for i in range(300)], abs=1e-9)


# ------------------------------------------------------------------------------------ baselines

def test_mean_baseline_gives_zero_mean_advantages_per_image():
    rewards = torch.rand(6, 5, generator=torch.Generator().manual_seed(0)) * 3
    advantage = advantages(rewards, "mean")
    assert advantage.sum(dim=1) == pytest.approx(torch.zeros(6), abs=1e-5)
    others = (rewards[2].sum() - rewards[2, 1]) / 4
    assert float(advantage[2, 1]) == pytest.approx(float(rewards[2, 1] - others))


def test_greedy_baseline_subtracts_the_greedy_reward():
    rewards = torch.tensor([[1.0, 2.0], [0.5, 0.0]])
    assert torch.equal(advantages(rewards, "greedy", torch.tensor([1.0, 0.5])), torch.tensor([[0.0, 1.0], [0.0, -0.5]]))
    with pytest.raises(ValueError, match="greedy_rewards"):
        advantages(rewards, "greedy")
    with pytest.raises(ValueError, match="at least 2"):
        ScstConfig(samples_per_image=1)


# ------------------------------------------------------------------------------------ sampling

COLOURS = ["red", "blue", "green", "black"]
ANIMALS = ["dog", "cat"]


def _records(split: str) -> tuple[list[CaptionRecord], torch.Tensor]:
    """8 images, each a (colour, animal) pair with three captions; features identify the pair."""
    records = []
    for i, (colour, animal) in enumerate((c, a) for c in COLOURS for a in ANIMALS):
        captions = [f"a {colour} {animal} runs on the grass .", f"the {colour} {animal} is running .",
                    f"a {animal} that is {colour} ."]
        records.append(CaptionRecord(f"{split}{i}.jpg", f"/nowhere/{split}{i}.jpg", captions, split))
    features = torch.randn(len(records), 12, generator=torch.Generator().manual_seed(5 if split == "train" else 6))
    if split == "val":  # the same pairs, features close to the training ones
        features = _records("train")[1] + 0.05 * features
    return records, features


def _vocab() -> Vocabulary:
    records, _ = _records("train")
    return Vocabulary.build((tokenize(c) for r in records for c in r.captions), min_count=1)


def _pretrained(path, steps: int = 10, dropout: float = 0.1, seed: int = 0):
    """A small decoder trained a little with cross-entropy, saved as the SCST starting point."""
    torch.manual_seed(seed)
    records, features = _records("train")
    vocab = _vocab()
    model = CaptionDecoder(ModelConfig(vocab_size=len(vocab), feature_dim=12, embed_dim=16, hidden_dim=32,
                                       image_dim=16, dropout=dropout))
    data = encode_split(records, features, vocab, max_caption_length=12)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits, targets = model(*data.batch(torch.arange(len(data.lengths))))
        loss = torch.nn.functional.cross_entropy(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_checkpoint(path, model, vocab, {"encoder": "test"}, {"seed": seed, "data_fingerprint": "toy"})


def _teacher_forced_log_probs(model: CaptionDecoder, features: torch.Tensor, tokens: torch.Tensor,
                              lengths: torch.Tensor, start_id: int) -> torch.Tensor:
    """Sum over each row's emitted tokens of log_softmax(model.forward logits), row order kept."""
    captions = torch.cat([torch.full((tokens.size(0), 1), start_id), tokens], dim=1)  # <start> + emitted
    caption_lengths = lengths + 1
    order = torch.argsort(caption_lengths, descending=True)
    logits, targets = model(features[order], captions[order], caption_lengths[order])
    token_log_probs = torch.log_softmax(logits, dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)
    row_of_token = pack_padded_sequence(order.unsqueeze(1).expand(-1, tokens.size(1)), lengths[order],
                                        batch_first=True).data
    return torch.zeros(tokens.size(0)).index_add(0, row_of_token, token_log_probs)


def test_sampled_log_probs_match_teacher_forcing(tmp_path):
    checkpoint = load_checkpoint(_pretrained(tmp_path / "init.safetensors", steps=5))
    model, vocab = checkpoint.model, checkpoint.vocab  # eval mode: no dropout, so both passes agree
    _, features = _records("train")
    torch.manual_seed(0)
    sampled = sample_captions(model, features, vocab, samples_per_image=3, max_length=6)
    assert sampled.log_probs.requires_grad
    assert sampled.tokens.shape == (24, 6)
    assert sampled.finished.any() and not sampled.finished.all()  # some rows cut at max_length
    recomputed = _teacher_forced_log_probs(model, features.repeat_interleave(3, dim=0), sampled.tokens,
                                           sampled.lengths, vocab.start_id)
    assert sampled.log_probs.detach() == pytest.approx(recomputed.detach(), abs=1e-4)
    # Tokens past a row's length are padding; a finished row's last token is <end>.
    for row, length in enumerate(sampled.lengths.tolist()):
        assert (sampled.tokens[row, length:] == vocab.pad_id).all()
        assert (sampled.tokens[row, length - 1] == vocab.end_id) == sampled.finished[row]
    # The gradient reaches the weights.
    sampled.log_probs.sum().backward()
    assert model.output.weight.grad is not None and model.output.weight.grad.abs().sum() > 0


def test_draw_follows_the_probabilities():
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]]).expand(40000, -1)
    drawn = draw(probs, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(drawn, minlength=4).double() / len(drawn)
    assert frequencies[1] == 0
    assert frequencies.tolist() == pytest.approx([0.2, 0.0, 0.5, 0.3], abs=0.01)


def test_sampling_never_draws_pad_start_or_unk(tmp_path):
    checkpoint = load_checkpoint(_pretrained(tmp_path / "init.safetensors", steps=0))
    model, vocab = checkpoint.model, checkpoint.vocab
    with torch.no_grad():  # make the banned tokens by far the most likely
        for banned in (vocab.pad_id, vocab.start_id, vocab.unk_id):
            model.output.bias[banned] = 30.0
    _, features = _records("train")
    sampled = sample_captions(model, features, vocab, samples_per_image=4, max_length=8,
                              generator=torch.Generator().manual_seed(0))
    emitted = torch.cat([row[:length] for row, length in zip(sampled.tokens, sampled.lengths, strict=True)])
    assert not torch.isin(emitted, torch.tensor([vocab.pad_id, vocab.start_id, vocab.unk_id])).any()
    assert all(w not in ("<pad>", "<start>", "<unk>") for words in caption_words(sampled.tokens, vocab)
               for w in words)


# ------------------------------------------------------------------------------------ training

def _config(epochs: int = 4, baseline: str = "mean") -> ScstConfig:
    return ScstConfig(epochs=epochs, batch_images=2, samples_per_image=5, lr=1e-2, max_length=10, patience=10,
                      seed=3, baseline=baseline, val_decode=DecodeConfig(strategy="beam", beam_size=2, max_length=10))


def _train(out_dir, init, epochs=4, resume=False, stop_after=None, baseline="mean"):
    train_records, train_features = _records("train")
    val_records, val_features = _records("val")

    def stop(entry):
        if stop_after is not None and entry["epoch"] == stop_after:
            raise KeyboardInterrupt

    return train_scst(train_records, train_features, val_records, val_features, out_dir, init,
                      _config(epochs, baseline), resume=resume, progress=False, on_epoch_end=stop)


@pytest.mark.slow
def test_scst_raises_the_reward(tmp_path):
    init = _pretrained(tmp_path / "init.safetensors")
    records, features = _records("train")
    scorer = CiderDReward(reference_tokens(records))
    initial = load_checkpoint(init)
    # The probe samples 50 captions per image in eval mode: far less noisy than one epoch's 40 samples.
    before = mean_reward(initial.model, initial.vocab, scorer, features, samples_per_image=50, max_length=10)

    best = _train(tmp_path / "run", init, epochs=8)
    log = [json.loads(line) for line in (tmp_path / "run" / LOG).read_text().splitlines()]
    assert [e["epoch"] for e in log] == list(range(9))
    assert log[0]["mean_reward"] is None  # epoch 0: the initial model, validated only
    assert {"mean_reward", "loss", "val", "train_seconds", "val_seconds", "reward_seconds"} <= log[1].keys()
    rewards = [e["mean_reward"] for e in log[1:]]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:2])
    for name in (BEST, LAST, CURVES):
        assert (tmp_path / "run" / name).is_file()

    final, _ = read_raw(tmp_path / "run" / LAST)
    model = initial.model
    model.load_state_dict({k[6:]: v for k, v in final.items() if k.startswith("model.")})
    after = mean_reward(model, initial.vocab, scorer, features, samples_per_image=50, max_length=10)
    assert after > before + 0.15, (before, after)
    checkpoint = load_checkpoint(best)
    assert checkpoint.info["stage"] == "scst" and checkpoint.info["seed"] == 3
    assert checkpoint.encoder == {"encoder": "test"} and checkpoint.info["data_fingerprint"] == "toy"
    best_epoch = max(log, key=lambda e: e["val"]["CIDEr-D"])
    assert checkpoint.info["val_metrics"] == best_epoch["val"]


@pytest.mark.slow
def test_greedy_baseline_runs(tmp_path):
    init = _pretrained(tmp_path / "init.safetensors")
    _train(tmp_path / "run", init, epochs=1, baseline="greedy")
    log = [json.loads(line) for line in (tmp_path / "run" / LOG).read_text().splitlines()]
    assert "mean_greedy_reward" in log[1]


@pytest.mark.slow
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    init = _pretrained(tmp_path / "init.safetensors")
    _train(tmp_path / "straight", init, epochs=3)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "interrupted", init, epochs=3, stop_after=1)
    _train(tmp_path / "interrupted", init, epochs=3, resume=True)
    straight, _ = read_raw(tmp_path / "straight" / LAST)
    resumed, _ = read_raw(tmp_path / "interrupted" / LAST)
    for key, value in straight.items():
        if key.startswith("model."):
            assert torch.equal(value, resumed[key]), key
    log = (tmp_path / "interrupted" / LOG).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="the run has trained 3 epochs already, more than --epochs 2"):
        _train(tmp_path / "interrupted", init, epochs=2, resume=True)


@pytest.mark.slow
def test_a_finished_run_resumed_with_more_epochs_ends_as_the_longer_run(tmp_path):
    """SCST's learning rate is constant, so `--resume --epochs 3` continues a finished 2-epoch run to the
    weights of an uninterrupted 3-epoch run."""
    init = _pretrained(tmp_path / "init.safetensors")
    _train(tmp_path / "straight", init, epochs=3)
    _train(tmp_path / "grown", init, epochs=2)
    _train(tmp_path / "grown", init, epochs=3, resume=True)
    straight, _ = read_raw(tmp_path / "straight" / LAST)
    grown, metadata = read_raw(tmp_path / "grown" / LAST)
    assert straight.keys() == grown.keys()
    for key, value in straight.items():
        assert torch.equal(value, grown[key]), key
    assert json.loads(metadata["info"])["scst_config"]["epochs"] == 3
    assert [json.loads(line)["epoch"] for line in (tmp_path / "grown" / LOG).read_text().splitlines()] == [0, 1, 2, 3]


@pytest.mark.slow
def test_sampling_dropout_can_be_set_apart_from_the_xe_rate(tmp_path):
    init = _pretrained(tmp_path / "init.safetensors", dropout=0.5)
    seen = []

    def watch(entry):
        seen.append(entry)

    records, features = _records("train")
    val_records, val_features = _records("val")
    config = ScstConfig(epochs=1, batch_images=4, samples_per_image=3, lr=1e-3, seed=3, dropout=0.0,
                        val_decode=DecodeConfig(strategy="greedy"))
    best = train_scst(records, features, val_records, val_features, tmp_path / "run", init, config,
                      progress=False, on_epoch_end=watch)
    assert seen and load_checkpoint(best).model.config.dropout == 0.5  # the saved config keeps the XE rate
    # With the rate at 0, a train-mode step (as sampling runs) gives exactly the eval-mode distribution.
    model = load_checkpoint(init).model
    tokens, state = torch.tensor([1, 1]), model.init_state(features[:2])
    set_dropout(model, 0.0)
    model.train()
    assert torch.equal(model.step(tokens, model.init_state(features[:2]))[0], model.eval().step(tokens, state)[0])
    assert json.loads((tmp_path / "run" / LOG).read_text().splitlines()[0])["epoch"] == 0
    with pytest.raises(ValueError, match="dropout"):
        ScstConfig(dropout=1.0)


# ------------------------------------------------------------------------------------ beam candidates

def test_beam_candidates_are_the_beams_and_their_log_probs_are_recomputed_with_gradients(tmp_path):
    checkpoint = load_checkpoint(_pretrained(tmp_path / "init.safetensors", steps=5))
    model, vocab = checkpoint.model, checkpoint.vocab
    _, features = _records("train")
    model.train()  # beam_candidates decodes in eval mode and gives the mode back
    captions, finished = beam_candidates(model, features, vocab, beams=4, max_length=6, length_penalty=0.5)
    assert model.training
    model.eval()
    expected = beam_search(model, features, DecodeConfig(beam_size=4, n_best=4, max_length=6, length_penalty=0.5),
                           vocab.start_id, vocab.end_id, suppress_ids=(vocab.pad_id, vocab.start_id, vocab.unk_id))
    assert captions == [[h.tokens for h in image] for image in expected]
    flat_finished = [h.finished for image in expected for h in image]
    assert any(flat_finished) and not all(flat_finished)  # both kinds, as max_length cuts some
    rows = torch.arange(8).repeat_interleave(torch.tensor([len(image) for image in captions]))
    log_probs = caption_log_probs(model, features[rows], [t for image in captions for t in image], flat_finished, vocab)
    assert log_probs.requires_grad
    assert log_probs.detach().tolist() == pytest.approx([h.log_prob for image in expected for h in image], abs=1e-4)


def _beam_config(epochs: int) -> ScstConfig:
    return ScstConfig(epochs=epochs, batch_images=2, samples_per_image=4, lr=1e-2, max_length=10, patience=10,
                      seed=3, candidates="beam", val_decode=DecodeConfig(strategy="beam", beam_size=2, max_length=10))


@pytest.mark.slow
def test_beam_candidates_training_raises_the_top_beams_reward(tmp_path):
    init = _pretrained(tmp_path / "init.safetensors")
    records, features = _records("train")
    scorer = CiderDReward(reference_tokens(records))

    def top_beam_reward(model, vocab) -> float:
        captions, _ = beam_candidates(model, features, vocab, beams=4, max_length=10, length_penalty=0.5)
        words = [vocab.decode(image[0]) for image in captions]
        return float(scorer.score_images(words, list(range(len(words)))).mean())

    initial = load_checkpoint(init)
    before = top_beam_reward(initial.model, initial.vocab)
    val_records, val_features = _records("val")
    train_scst(records, features, val_records, val_features, tmp_path / "run", init, _beam_config(6), progress=False)
    final, _ = read_raw(tmp_path / "run" / LAST)
    model = initial.model
    model.load_state_dict({k[6:]: v for k, v in final.items() if k.startswith("model.")})
    after = top_beam_reward(model, initial.vocab)
    assert after > before + 0.1, (before, after)
    log = [json.loads(line) for line in (tmp_path / "run" / LOG).read_text().splitlines()]
    assert [e["epoch"] for e in log] == list(range(7)) and log[1]["mean_sample_length"] > 0


def test_beam_candidates_need_the_mean_baseline():
    with pytest.raises(ValueError, match="mean baseline"):
        ScstConfig(candidates="beam", baseline="greedy")
    with pytest.raises(ValueError, match="candidates"):
        ScstConfig(candidates="top")


@pytest.mark.slow
def test_scst_keeps_the_checkpoints_own_cnn_and_refuses_a_cache_of_another(tmp_path):
    init = _pretrained(tmp_path / "plain.safetensors")
    plain = load_checkpoint(init)
    cnn = {"conv.weight": torch.randn(4, 3, 1, 1), "conv.bias": torch.zeros(4)}
    own = save_checkpoint(tmp_path / "own.safetensors", plain.model, plain.vocab,
                          {"encoder": "test", "weights_hash": "abc"}, plain.info, encoder_state=cnn)
    records, features = _records("train")
    val_records, val_features = _records("val")
    with pytest.raises(ValueError, match="captioner features --checkpoint"):
        train_scst(records, features, val_records, val_features, tmp_path / "bad", own, _config(1),
                   progress=False, features_encoder={"encoder": "test", "weights_hash": "def"})
    best = train_scst(records, features, val_records, val_features, tmp_path / "run", own, _config(1),
                      progress=False, features_encoder={"encoder": "test", "weights_hash": "abc"})
    for path in (best, tmp_path / "run" / LAST):
        carried = load_checkpoint(path).encoder_state
        assert carried is not None and all(torch.equal(carried[k], v) for k, v in cnn.items()), path


@pytest.mark.slow
def test_scst_stops_early_keeps_the_best_epoch_and_refuses_torchrun_and_amp(tmp_path, monkeypatch):
    init = _pretrained(tmp_path / "init.safetensors")
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9])  # epochs 0..4; patience 2 stops after epoch 3

    def scripted(self, model):
        score = next(scores)
        return {"BLEU-4": score / 2, "CIDEr-D": score}

    monkeypatch.setattr(SelfCritical, "validate", scripted)
    records, features = _records("train")
    val_records, val_features = _records("val")
    config = ScstConfig(epochs=6, batch_images=4, samples_per_image=3, lr=1e-3, patience=2, seed=3,
                        val_decode=DecodeConfig(strategy="greedy"))
    best = train_scst(records, features, val_records, val_features, tmp_path / "run", init, config, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / LOG).read_text().splitlines()]
    assert [(entry["epoch"], entry["best"]) for entry in log] == [(0, True), (1, True), (2, False), (3, False)]
    assert load_checkpoint(best).info["epoch"] == 1
    assert json.loads(read_raw(tmp_path / "run" / LAST)[1]["training_state"])["epoch"] == 3

    objective = SelfCritical(records, features, val_records, val_features, init, config)
    with pytest.raises(ValueError, match="--amp: SCST runs in float32"):
        Trainer(objective, tmp_path / "amp", amp="bf16")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="SCST runs in one process; start it without torchrun"):
        Trainer(objective, tmp_path / "ddp")
