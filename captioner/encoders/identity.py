"""Is it the same CNN? The one rule every place that must not mix CNNs applies.

A CNN is named by its encoder (`efficientnet_lite0`) and the hash of its weights (`state_dict_hash`), as a
checkpoint's `encoder` entry, a feature cache's meta.json, a caption memory and a built `Encoder` record
them. Two descriptions name the same CNN unless they disagree on a field that both record: an entry
without a weights hash (an older or hand-made one) is not refused for lacking it.

Checked where features and decoders meet: a checkpoint and the CNN built for it (`checkpoint_encoder`),
a feature cache and the CNN writing into it (with its own format fields, `features.cache`), a cache and the
checkpoint reading it (`features.records`), training features and the checkpoint a run starts from
(`train.warm_start`), a caption memory and the checkpoint it re-ranks for (`decoding.memory`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

IDENTITY_FIELDS = ("encoder", "weights_hash")


class HasIdentity(Protocol):  # an `Encoder`
    name: str
    weights_hash: str


CnnDescription = Mapping[str, Any] | HasIdentity


def cnn_identity(cnn: CnnDescription) -> dict[str, Any]:
    """{"encoder": name, "weights_hash": hash} of an Encoder or of a description (missing fields: None)."""
    if isinstance(cnn, Mapping):
        return {field: cnn.get(field) for field in IDENTITY_FIELDS}
    return {"encoder": cnn.name, "weights_hash": cnn.weights_hash}


def cnn_mismatch(found: CnnDescription, expected: CnnDescription) -> list[str]:
    """The identity fields in which two CNNs differ, each compared only where both record it."""
    a, b = cnn_identity(found), cnn_identity(expected)
    return [field for field in IDENTITY_FIELDS if a[field] and b[field] and a[field] != b[field]]


def describe_cnn(cnn: CnnDescription) -> str:
    identity = cnn_identity(cnn)
    return f"{identity['encoder'] or 'an unnamed CNN'} (weights hash {identity['weights_hash'] or 'not recorded'})"


def check_same_cnn(found: CnnDescription, expected: CnnDescription, where: str, found_what: str,
                   expected_what: str, fix: str, error: type[Exception] = ValueError) -> None:
    """Raise `error` ("{where}: {found_what} X, but {expected_what} Y; {fix}") unless both name one CNN."""
    if cnn_mismatch(found, expected):
        raise error(f"{where}: {found_what} {describe_cnn(found)}, but {expected_what} {describe_cnn(expected)}; "
                    f"{fix}")
