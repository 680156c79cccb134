"""The one "same CNN?" rule: encoder name and weights hash, each compared only where both sides record it."""

from __future__ import annotations

import pytest

from captioner.decoding.memory import CaptionMemoryError
from captioner.encoders.identity import check_same_cnn, cnn_identity, cnn_mismatch


class FakeEncoder:
    name, weights_hash = "efficientnet_lite0", "abc"


def test_identity_of_an_encoder_and_of_descriptions():
    assert cnn_identity(FakeEncoder()) == {"encoder": "efficientnet_lite0", "weights_hash": "abc"}
    assert cnn_identity({"encoder": "resnet50", "feature_dim": 2048}) == {"encoder": "resnet50", "weights_hash": None}


@pytest.mark.parametrize("found, expected, differing", [
    ({"encoder": "a", "weights_hash": "1"}, {"encoder": "a", "weights_hash": "1"}, []),
    ({"encoder": "a", "weights_hash": "1"}, {"encoder": "a", "weights_hash": "2"}, ["weights_hash"]),
    ({"encoder": "a", "weights_hash": "1"}, {"encoder": "b", "weights_hash": "1"}, ["encoder"]),
    ({"encoder": "a"}, {"encoder": "a", "weights_hash": "2"}, []),  # a hash not recorded is not a difference
    ({}, {"encoder": "b", "weights_hash": "2"}, []),
])
def test_fields_are_compared_where_both_record_them(found, expected, differing):
    assert cnn_mismatch(found, expected) == differing
    assert cnn_mismatch(expected, found) == differing


def test_the_error_names_the_place_both_cnns_and_the_fix():
    check_same_cnn(FakeEncoder(), {"encoder": "efficientnet_lite0"}, "ck.safetensors", "x", "y", "fix it")
    with pytest.raises(CaptionMemoryError) as caught:
        check_same_cnn(FakeEncoder(), {"weights_hash": "def"}, "ck.safetensors", "the memory was built with",
                       "its CNN is", "build it again", CaptionMemoryError)
    assert str(caught.value) == ("ck.safetensors: the memory was built with efficientnet_lite0 (weights hash abc), "
                                 "but its CNN is an unnamed CNN (weights hash def); build it again")
