"""captioner: a Show-and-Tell-style image captioner (CNN features + LSTM decoder).

    from captioner import Captioner
    captioner = Captioner.from_pretrained()            # the shipped checkpoint
    result = captioner.caption("dog.jpg", strategy="beam", beam_size=3)[0]
    print(result.caption, result.captions[0].log_prob)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Captioner", "CaptionResult", "DecodeConfig", "__version__"]

if TYPE_CHECKING:
    from captioner.api import Captioner, CaptionResult
    from captioner.config import DecodeConfig


def __getattr__(name: str):
    # torch is imported on first use, so `captioner --help` and light tools stay fast
    if name in ("Captioner", "CaptionResult"):
        from captioner import api

        return getattr(api, name)
    if name == "DecodeConfig":
        from captioner.config import DecodeConfig

        return DecodeConfig
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
