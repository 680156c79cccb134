"""The CUDA doors: the decoder, batched decoding and training (fp32, bf16 and fp16 autocast) on a GPU give
what the CPU gives, and a torchrun session joins an NCCL group. Skipped where no GPU is visible, which is
every CI machine; run them on a GPU machine with `python -m pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import REPO_ROOT, decoder_batch, train_on_random_captions

from captioner.checkpoint import load_checkpoint
from captioner.config import DecodeConfig, ModelConfig
from captioner.decoding import decode
from captioner.model import CaptionDecoder
from captioner.train import BEST

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")

@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 would round fp32 matrix products to 10 mantissa bits; compare against the CPU without it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _model(**overrides) -> CaptionDecoder:
    torch.manual_seed(0)
    settings = {"vocab_size": 40, "feature_dim": 32, "embed_dim": 24, "hidden_dim": 48, "image_dim": 16,
                "dropout": 0.0, **overrides}
    return CaptionDecoder(ModelConfig(**settings)).eval()


@pytest.mark.parametrize("settings", [{}, {"num_layers": 2}, {"image_input": "first", "image_dim": 24}])
def test_teacher_forced_logits_match_the_cpu(settings):
    model = _model(**settings)
    features, captions, lengths = decoder_batch(feature_dim=32)
    with torch.no_grad():
        cpu_logits, cpu_targets = model(features, captions, lengths)
        gpu_logits, gpu_targets = model.cuda()(features.cuda(), captions.cuda(), lengths)
    assert torch.equal(cpu_targets, gpu_targets.cpu())
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config", [DecodeConfig(strategy="greedy", max_length=12),
                                    DecodeConfig(strategy="beam", beam_size=3, n_best=3, max_length=12),
                                    DecodeConfig(strategy="beam", beam_size=5, max_length=12, length_penalty=0.0)])
def test_batched_decoding_matches_the_cpu(config):
    """Same hypotheses (tokens, finished) and scores for every image; the batch is decoded on the GPU."""
    model = _model()
    features = torch.relu(torch.randn(17, 32, generator=torch.Generator().manual_seed(2)))
    on_cpu = decode(model, features, config, start_id=1, end_id=2, suppress_ids=(0, 3))
    on_gpu = decode(model.cuda(), features.cuda(), config, start_id=1, end_id=2, suppress_ids=(0, 3))
    assert len(on_cpu) == len(on_gpu) == 17
    for cpu_image, gpu_image in zip(on_cpu, on_gpu, strict=True):
        assert [(h.tokens, h.finished) for h in gpu_image] == [(h.tokens, h.finished) for h in cpu_image]
        for cpu_h, gpu_h in zip(cpu_image, gpu_image, strict=True):
            assert gpu_h.score == pytest.approx(cpu_h.score, abs=1e-4)


def test_sampling_on_cuda_is_reproducible():
    model = _model().cuda()
    features = torch.relu(torch.randn(5, 32, device="cuda"))
    config = DecodeConfig(strategy="sample", n_best=4, max_length=10, temperature=1.5)

    def run(seed):
        generator = torch.Generator(device="cuda").manual_seed(seed)
        return [[h.tokens for h in image] for image in decode(model, features, config, 1, 2, (0, 3), generator)]

    assert run(0) == run(0)
    assert run(0) != run(1)


@pytest.mark.parametrize("amp", [None, "bf16", "fp16"])
def test_training_on_cuda_learns_like_the_cpu(tmp_path, amp):
    """Same seed and data: the CUDA run's losses follow the CPU's (closely in fp32, loosely under autocast),
    and its checkpoint loads and decodes on the CPU."""
    _, cpu_log = train_on_random_captions(tmp_path / "cpu", "cpu")
    best, gpu_log = train_on_random_captions(tmp_path / "gpu", "cuda", amp)
    cpu_losses = [entry["train_loss"] for entry in cpu_log]
    gpu_losses = [entry["train_loss"] for entry in gpu_log]
    assert gpu_losses[-1] < gpu_losses[0]
    tolerance = 1e-3 if amp is None else 5e-2
    assert gpu_losses == pytest.approx(cpu_losses, rel=tolerance), (gpu_losses, cpu_losses)
    checkpoint = load_checkpoint(best)
    assert checkpoint.info["device"] == "cuda" and checkpoint.info["amp"] == amp
    assert all(p.device.type == "cpu" for p in checkpoint.model.parameters())
    captions = decode(checkpoint.model, torch.randn(2, 16), DecodeConfig(strategy="greedy", max_length=8),
                      checkpoint.vocab.start_id, checkpoint.vocab.end_id)
    assert len(captions) == 2


WORKER = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from captioner import distributed
    sys.path.insert(0, {tests!r})
    from helpers import train_on_random_captions

    out = Path(sys.argv[1])
    device = torch.device("cuda", distributed.local_rank())
    with distributed.session(device):
        assert torch.distributed.get_backend() == "nccl", torch.distributed.get_backend()
        gathered = distributed.all_gather_object(distributed.rank())
        best, log = train_on_random_captions(out, device)
        if distributed.is_main():
            (out / "worker.json").write_text(json.dumps({{"gathered": gathered, "world": distributed.world_size(),
                                                         "losses": [e["train_loss"] for e in log]}}))
""")


def test_torchrun_on_cuda_joins_an_nccl_group_and_trains(tmp_path):
    """One process per visible GPU (one on a one-GPU machine: NCCL refuses two ranks on one device)."""
    processes = torch.cuda.device_count()
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(REPO_ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(processes), str(script), str(tmp_path / "run")], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    report = json.loads((tmp_path / "run" / "worker.json").read_text())
    assert report["world"] == processes and report["gathered"] == list(range(processes))
    assert report["losses"][-1] < report["losses"][0]
    assert (tmp_path / "run" / BEST).is_file()
