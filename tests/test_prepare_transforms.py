"""One image -> one uint8 (C, H, W) array: modes, transparency, 16-bit, EXIF, crop and pad."""

import io

import numpy as np
import pytest
from PIL import Image

from ddpm.transforms import Spec, fit_square, prepare_image, probe_mode


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """Stored 32 wide x 16 high: left half black, right half white. Orientation 6 means
    'rotate 90 degrees clockwise to display', so it shows 16 wide x 32 high, black on top."""
    stored = np.zeros((16, 32), dtype=np.uint8)
    stored[:, 16:] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)  # 32896 = 128 * 257
    payload = encode(Image.fromarray(values))
    assert probe_mode(payload) == "I;16"
    out = prepare_image(payload, Spec(resolution=2, channels=1)).image
    assert out.tolist() == [[[0, 255], [128, 1]]]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_take_the_background_colour(mode):
    if mode == "P":
        img = Image.new("P", (8, 8), 0)
        img.putpalette([10, 200, 30] + [0, 0, 0] * 255)
        img.info["transparency"] = 0
    else:
        img = Image.new(mode, (8, 8), (90, 0) if mode == "LA" else (10, 200, 30, 0))
    out = prepare_image(encode(img), Spec(resolution=4, channels=3, background=(0, 128, 255))).image
    assert out.shape == (3, 4, 4)
    assert out[:, 0, 0].tolist() == [0, 128, 255]


def test_half_transparent_grey_blends_with_the_background():
    img = Image.new("LA", (4, 4), (0, 128))  # black at alpha 128/255, over white
    out = prepare_image(encode(img), Spec(resolution=4, channels=1)).image
    assert out.shape == (1, 4, 4) and abs(int(out[0, 0, 0]) - 127) <= 1


def test_exif_orientation_is_applied():
    out = prepare_image(exif_rotated_jpeg(6), Spec(resolution=16, channels=1, fit="pad", background=(128,) * 3)).image[0]
    # displayed 16x32 padded into 16x16: black top half, white bottom half, grey bars left and right
    assert out[1:7, 6:10].max() < 40 and out[9:15, 6:10].min() > 215
    assert out[8, 0] == 128 and out[8, 15] == 128
    plain = prepare_image(exif_rotated_jpeg(1), Spec(resolution=16, channels=1, fit="pad")).image[0]
    assert plain[6:10, 1:7].max() < 40 and plain[6:10, 9:15].min() > 215  # unrotated: black left


def test_crop_keeps_the_centre_and_pad_keeps_everything():
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, 10:20] = 255  # white centre square
    img = Image.fromarray(wide)
    crop = np.asarray(fit_square(img, 10, "crop"))
    assert crop.min() >= 200  # only the white centre survives
    pad = np.asarray(fit_square(img, 30, "pad", background=(0, 0, 255)))
    assert pad.shape == (30, 30, 3) and pad[0, 0].tolist() == [0, 0, 255] and pad[15, 15].tolist() == [255] * 3
    assert pad[15, 0].tolist() == [0, 0, 0]  # the black sides of the original are kept


def test_small_images_are_upscaled_and_flagged():
    r = prepare_image(encode(Image.new("L", (3, 5), 200)), Spec(resolution=8, channels=1))
    assert r.upscaled and r.image.shape == (1, 8, 8) and (r.image == 200).all()
    assert not prepare_image(encode(Image.new("L", (9, 8))), Spec(resolution=8, channels=1)).upscaled


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "1", "CMYK"])
def test_every_mode_becomes_uint8_grey_or_rgb(mode):
    img = Image.new(mode, (12, 10))
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    for channels in (1, 3):
        r = prepare_image(encode(img, fmt), Spec(resolution=6, channels=channels))
        assert r.error is None and r.image.dtype == np.uint8 and r.image.shape == (channels, 6, 6)


def test_grey_to_rgb_replicates_the_channel():
    out = prepare_image(encode(Image.new("L", (4, 4), 77)), Spec(resolution=4, channels=3)).image
    assert (out == 77).all() and out.shape == (3, 4, 4)


@pytest.mark.parametrize("payload", [b"", b"this is not an image", "truncated"])
def test_unreadable_input_is_a_result_not_an_exception(payload, tmp_path):
    if payload == "truncated":
        data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
        payload = data[: len(data) // 2]
    r = prepare_image(payload, Spec(resolution=8, channels=3))
    assert r.image is None and r.error
    missing = prepare_image(str(tmp_path / "gone.png"), Spec(resolution=8, channels=3))
    assert missing.image is None and "No such file" in missing.error
