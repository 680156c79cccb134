"""Image encoders: pretrained CNNs that turn an image into one pooled feature vector.

    registry           EncoderSpec, Encoder, register_encoder / get_encoder, the checkpoint's CNN
    preprocessing      PIL image -> uint8 pixels -> normalised float32
    weights            packaged / torchvision / local-file / in-memory weights, their hash
    fusing             BatchNorm folding for inference
    identity           is it the same CNN? (encoder name and weights hash: the one rule)
    efficientnet_lite  EfficientNet-Lite0/2 in plain PyTorch, offline weights (the default encoder)
    resnet             torchvision ResNet-50/101/152 (weights downloaded, or a local file)

Importing this package registers every encoder.
"""

from captioner.encoders import efficientnet_lite, resnet  # noqa: F401  (they register themselves)
from captioner.encoders.efficientnet_lite import (
    LITE0_STAGE_DEPTHS,
    LITE2_STAGE_DEPTHS,
    convert_lite0_state_dict,
    convert_lite_state_dict,
    lite0_packaged_weights,
    lite2_packaged_weights,
)
from captioner.encoders.fusing import fuse_batchnorm_into_conv
from captioner.encoders.identity import check_same_cnn, cnn_identity, cnn_mismatch
from captioner.encoders.preprocessing import Preprocessor
from captioner.encoders.registry import (
    DEFAULT_ENCODER,
    Encoder,
    EncoderSpec,
    Weights,
    check_trained_cnn,
    checkpoint_encoder,
    get_encoder,
    get_encoder_spec,
    list_encoders,
    register_encoder,
)
from captioner.encoders.weights import (
    EncoderUnavailableError,
    load_strict,
    load_weights_file,
    state_dict_hash,
    weights_state,
)

__all__ = [
    "DEFAULT_ENCODER", "LITE0_STAGE_DEPTHS", "LITE2_STAGE_DEPTHS", "Encoder", "EncoderSpec",
    "EncoderUnavailableError", "Preprocessor", "Weights", "check_same_cnn", "check_trained_cnn", "checkpoint_encoder", "cnn_identity", "cnn_mismatch",
    "convert_lite0_state_dict", "convert_lite_state_dict", "fuse_batchnorm_into_conv", "get_encoder",
    "get_encoder_spec", "list_encoders", "lite0_packaged_weights", "lite2_packaged_weights", "load_strict",
    "load_weights_file", "register_encoder", "state_dict_hash", "weights_state",
]
