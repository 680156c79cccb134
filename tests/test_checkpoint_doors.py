"""A checkpoint through the doors that build its CNN: a run folder works as a checkpoint everywhere (its
best.safetensors), and a CNN that does not fit its encoder is refused in one line naming the file."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from captioner.api import Captioner
from captioner.apps.cli import main
from captioner.checkpoint import load_checkpoint, save_checkpoint
from captioner.encoders import EncoderUnavailableError, get_encoder_spec

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # each builds EfficientNet-Lite0


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 48), (200, 120, 40)).save(path)
    return path


def test_a_run_folder_is_a_checkpoint_for_the_api_and_the_caption_command(toy_checkpoint, photo, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(toy_checkpoint, run / "best.safetensors")
    captioner = Captioner.from_pretrained(run, device="cpu")
    assert captioner.checkpoint.path == run / "best.safetensors"
    direct = Captioner.from_pretrained(toy_checkpoint, device="cpu").caption([photo])[0].caption
    assert captioner.caption([photo])[0].caption == direct
    assert main(["caption", str(photo), "--checkpoint", str(run), "--concepts", "off"]) == 0
    assert direct in capsys.readouterr().out
    assert main(["info", str(run)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == str(run / "best.safetensors")


def test_a_cnn_tensor_of_the_wrong_shape_names_the_file(toy_checkpoint, photo, tmp_path, capsys):
    """It used to say "EncoderUnavailableError: state dict given in memory", with a traceback."""
    state = get_encoder_spec("efficientnet_lite0").build().state_dict()
    state["model.conv_head.weight"] = state["model.conv_head.weight"][:, :10].clone()
    checkpoint = load_checkpoint(toy_checkpoint)
    bad = save_checkpoint(tmp_path / "bad.safetensors", checkpoint.model, checkpoint.vocab, checkpoint.encoder,
                          encoder_state=state)
    with pytest.raises(EncoderUnavailableError, match=rf"^{bad}: the fine-tuned CNN it carries \(encoder\.\*\): "
                                                      r"weights do not fit .*wrong shape: conv_head.weight"):
        Captioner.from_pretrained(bad, device="cpu")
    assert main(["caption", str(photo), "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"captioner caption: error: {bad}: the fine-tuned CNN it carries (encoder.*): ") and \
        err.endswith("the file is damaged or was written for another encoder than efficientnet_lite0: use another "
                     "checkpoint"), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
