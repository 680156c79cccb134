"""Images: the one place that opens a photo.

    files   reading a file's bytes safely before decoding: regular files only, a size limit, stall timeouts
    load    `load_image`: a path, encoded bytes or a PIL image -> an upright 8-bit RGB image, or ImageLoadError
"""

from captioner.images.files import (
    DEFAULT_READ_TIMEOUT,
    ImageLoadError,
    file_size_limit,
    not_a_regular_file,
    read_descriptor,
    read_image_file,
)
from captioner.images.load import (
    DEFAULT_MAX_PIXELS,
    JPEG_HEADER_FACTOR,
    PROGRESSIVE_JPEG_HEADER_FACTOR,
    ImageSource,
    jpeg_scale,
    load_image,
    source_name,
)

__all__ = [
    "DEFAULT_MAX_PIXELS", "DEFAULT_READ_TIMEOUT", "JPEG_HEADER_FACTOR", "PROGRESSIVE_JPEG_HEADER_FACTOR",
    "ImageLoadError", "ImageSource", "file_size_limit", "jpeg_scale", "load_image", "not_a_regular_file",
    "read_descriptor", "read_image_file", "source_name",
]
