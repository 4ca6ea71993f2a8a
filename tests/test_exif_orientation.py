"""EXIF orientation: a JPEG stored sideways with Orientation 6 ("rotate 90 CW to view") is embedded and
thumbnailed upright by default, as viewers show it; ``exif="ignore"`` keeps the reference's stored pixel order."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fuselip_med.core.image_preprocess import ImagePreprocess
from fuselip_med.data.images import DecodeOptions, decode_image, load_image
from fuselip_med.search.app import thumbnail

ORIENTATION = 0x0112  # EXIF tag, value 6: the viewer rotates the stored image 90 degrees clockwise


@pytest.fixture
def sideways(tmp_path):
    """An upright 60 x 40 (w x h) picture with a white top band, stored rotated (40 x 60) with Orientation 6."""
    upright = np.zeros((40, 60, 3), np.uint8)
    upright[:10] = 255
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    path = tmp_path / "sideways.jpg"
    stored.save(path, quality=95, exif=exif)
    return path, Image.fromarray(upright)


def test_the_image_is_decoded_and_thumbnailed_upright(sideways):
    path, upright = sideways
    assert load_image(path).size == (60, 40)
    small = thumbnail(path, size=30)
    assert small.size == (30, 20) and np.asarray(small)[:4].mean() > 200 and np.asarray(small)[-4:].mean() < 50
    pixels = decode_image(path, DecodeOptions(image_size=32))
    assert pixels[:, :6].mean() > 0.8 and pixels[:, -6:].mean() < 0.2  # the white band on top


def test_ignore_keeps_the_reference_preprocessing_bit_for_bit(sideways):
    path, _ = sideways
    reference = ImagePreprocess()(Image.open(path))
    assert torch.equal(decode_image(path, DecodeOptions(exif="ignore")), reference)
    assert not torch.equal(decode_image(path), reference)
    with pytest.raises(ValueError, match="exif"):
        DecodeOptions(exif="rotate")
