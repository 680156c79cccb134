"""captioner: a Show-and-Tell-style image captioner (CNN features + LSTM decoder)."""

__version__ = "0.1.0"
