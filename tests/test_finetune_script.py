"""scripts/try_finetune_encoder.py: the CNN and the decoder train together, and what it saves says so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from conftest import REPO_ROOT

from captioner.api import Captioner
from captioner.checkpoint import read_raw
from captioner.encoder import get_encoder
from captioner.features import features_for_images
from captioner.images import load_image


def test_finetuning_changes_the_cnn_and_saves_its_hash(tiny_run, tmp_path):
    out = tmp_path / "finetune"
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "try_finetune_encoder.py"), str(tiny_run["checkpoint"]),
                    "--data", str(tiny_run["data"]), "--images", str(tiny_run["images"]), "--out", str(out),
                    "--epochs", "1", "--train-images", "8", "--val-images", "4", "--batch-images", "4",
                    "--encoder-lr", "1e-3", "--warmup-steps", "1"], check=True, capture_output=True, timeout=600)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0, 1]
    assert all(0 <= entry["val"]["CIDEr-D"] for entry in log) and log[1]["train_loss"] > 0
    tensors, metadata = read_raw(out / "last.safetensors")
    encoder = json.loads(metadata["encoder"])
    cnn = {key[len("encoder."):]: value for key, value in tensors.items() if key.startswith("encoder.")}
    assert cnn and {value.dtype for value in cnn.values()} <= {torch.float16, torch.int64}
    _, start = read_raw(tiny_run["checkpoint"])
    assert encoder["fine_tuned_from"] == json.loads(start["encoder"])["weights_hash"] != encoder["weights_hash"]
    # the checkpoint loads with its own CNN (the hash check passes), whose weights are the saved ones
    captioner = Captioner.from_pretrained(out / "last.safetensors", device="cpu")
    assert captioner.encoder.weights_hash == encoder["weights_hash"]
    packaged = get_encoder("efficientnet_lite0")
    image = load_image(tiny_run["images"] / Path(json.loads(tiny_run["data"].read_text())["images"][0]["filename"]))
    ours, theirs = features_for_images(captioner.encoder, [image]), features_for_images(packaged, [image])
    assert not torch.allclose(ours, theirs, atol=1e-3)
    assert captioner.caption(image)[0].caption
