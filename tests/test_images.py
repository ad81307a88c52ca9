"""xllava_jax.data.images against transformers' CLIPImageProcessorPil and LLaVA's expand2square."""

import functools
import io

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil

from xllava_jax.data.images import ImageConfig, ImageError, load_image, preprocess, to_rgb

SHAPES = [(640, 480), (480, 640), (337, 1000), (100, 100), (33, 57), (1, 300)]  # (width, height)


@functools.lru_cache
def hf_processor(size: int, square: bool = False) -> CLIPImageProcessorPil:
    resize = {"height": size, "width": size} if square else {"shortest_edge": size}
    return CLIPImageProcessorPil(size=resize, crop_size={"height": size, "width": size})


def hf_pixels(image: Image.Image, size: int, square: bool = False) -> np.ndarray:
    """HF's output, float32[size, size, 3] (channels last)."""
    return hf_processor(size, square)(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def assert_bit_identical(ours: np.ndarray, hf: np.ndarray) -> None:
    """Same dtype, same shape, every float equal: the module docstring's "bit-identical to HF"."""
    assert ours.dtype == hf.dtype == np.float32 and ours.shape == hf.shape, (ours.dtype, hf.dtype, ours.shape, hf.shape)
    np.testing.assert_array_equal(ours, hf)


def llava_expand2square(pil_img, background_color):
    """Verbatim from LLaVA's llava/mm_utils.py."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def textured(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image with gradients (so misplaced crops show) plus noise (so resampling errors show)."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x * 7 + y * 3) % 256], -1)
    noise = np.random.default_rng(seed).integers(-40, 41, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [336, 224])
@pytest.mark.parametrize("shape", SHAPES)
def test_crop_and_pad_match_hf(shape, size):
    image = textured(*shape)
    crop = preprocess(image, ImageConfig.for_vision(size, aspect="crop"))
    assert crop.shape == (size, size, 3) and crop.dtype == np.float32
    assert_bit_identical(crop, hf_pixels(image, size))

    cfg = ImageConfig.for_vision(size)
    assert cfg.aspect == "pad"
    padded = llava_expand2square(image, tuple(int(x * 255) for x in hf_processor(size).image_mean))
    assert_bit_identical(preprocess(image, cfg), hf_pixels(padded, size))


@pytest.mark.parametrize("shape", [(640, 480), (33, 57)])
def test_resize_matches_hf_square_resize(shape):
    image = textured(*shape, seed=1)
    ours = preprocess(image, ImageConfig.for_vision(32, aspect="resize"))
    assert_bit_identical(ours, hf_pixels(image, 32, square=True))


def test_custom_mean_std_and_tiny_size():
    cfg = ImageConfig(32, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], aspect="crop")
    image = textured(50, 40)
    hf = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ref = hf(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    assert_bit_identical(preprocess(image, cfg), ref)
    assert cfg.mean == (0.5, 0.5, 0.5) and hash(cfg) == hash(ImageConfig(32, (0.5,) * 3, (0.5,) * 3, "crop"))
    assert cfg.fill == (127, 127, 127)


def test_config():
    cfg = ImageConfig.for_vision(336)
    assert cfg.fill == (122, 116, 104)
    assert cfg.std == pytest.approx(hf_processor(336).image_std)
    for bad in (dict(size=0), dict(size=32, aspect="square"), dict(size=32, std=(1.0, 0.0, 1.0))):
        with pytest.raises(ValueError):
            ImageConfig(**bad)


def test_path_bytes_and_pil_agree(tmp_path):
    image = textured(60, 45)
    path = tmp_path / "a.png"
    path.write_bytes(encode(image))
    cfg = ImageConfig.for_vision(32)
    expected = preprocess(image, cfg)
    for source in (path, str(path), path.read_bytes(), bytearray(path.read_bytes())):
        np.testing.assert_array_equal(preprocess(source, cfg), expected)


@pytest.mark.parametrize("orientation, transpose", [
    (3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation(orientation, transpose):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(textured(48, 24), "JPEG", quality=95, exif=exif.tobytes())
    stored = Image.open(io.BytesIO(data)).convert("RGB")  # the pixels as stored, not yet rotated
    rotated = np.asarray(stored.transpose(transpose))
    np.testing.assert_array_equal(np.asarray(load_image(data)), rotated)
    cfg = ImageConfig.for_vision(32)
    np.testing.assert_array_equal(preprocess(data, cfg), preprocess(Image.fromarray(rotated), cfg))


def rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(to_rgb(image)).reshape(-1, 3)


def test_alpha_composited_over_white():
    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [0, 0, 0, 128], [200, 100, 50, 255]]], np.uint8))
    assert rgb(rgba).tolist() == [[255, 255, 255], [127, 127, 127], [200, 100, 50]]
    assert np.asarray(rgba.convert("RGB")).reshape(-1, 3)[0].tolist() == [10, 20, 30]  # what a bare convert gives
    la = Image.fromarray(np.array([[[100, 0], [100, 255]]], np.uint8), "LA")
    assert rgb(la).tolist() == [[255, 255, 255], [100, 100, 100]]
    # HF composites over white too, so the whole pipeline still matches it
    big = Image.fromarray(np.dstack([np.asarray(textured(40, 30)), np.tile(np.arange(0, 240, 6, np.uint8), (30, 1))]))
    assert_bit_identical(preprocess(big, ImageConfig.for_vision(32, "crop")), hf_pixels(big, 32))


def test_palette_with_and_without_transparency():
    palette = Image.new("P", (3, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    palette.putdata([0, 1, 2])
    assert rgb(palette).tolist() == [[0, 0, 0], [255, 0, 0], [0, 0, 255]]
    palette.info["transparency"] = 1
    assert rgb(palette).tolist() == [[0, 0, 0], [255, 255, 255], [0, 0, 255]]
    reloaded = load_image(encode(palette))  # the transparent index survives a PNG round trip
    assert np.asarray(reloaded).reshape(-1, 3).tolist() == [[0, 0, 0], [255, 255, 255], [0, 0, 255]]


def test_grey_bilevel_and_cmyk():
    assert rgb(Image.fromarray(np.array([[0, 77, 255]], np.uint8))).tolist() == [[0] * 3, [77] * 3, [255] * 3]
    assert rgb(Image.fromarray(np.array([[False, True]]))).tolist() == [[0] * 3, [255] * 3]
    cmyk = Image.frombytes("CMYK", (3, 1), bytes([0, 0, 0, 0, 255, 0, 0, 0, 0, 0, 0, 255]))
    assert rgb(cmyk).tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]
    jpeg = encode(Image.new("CMYK", (16, 16), (0, 255, 0, 0)), "JPEG", quality=100)
    np.testing.assert_allclose(np.asarray(load_image(jpeg)), np.full((16, 16, 3), (255, 0, 255)), atol=2)


def test_high_bit_depth_is_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 32896, 65535]], np.uint16)
    i16 = Image.open(io.BytesIO(encode(Image.fromarray(values))))
    assert i16.mode == "I;16"
    assert rgb(i16)[:, 0].tolist() == [0, 100, 128, 255]
    assert np.asarray(i16.convert("L")).tolist() == [[0, 255, 255, 255]]  # PIL's own conversion clips
    assert rgb(Image.fromarray(values.astype(np.int32)))[:, 0].tolist() == [0, 100, 128, 255]
    assert rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)))[:, 0].tolist() == [0, 128, 255]
    with pytest.raises(ImageError, match="outside the 16-bit range"):
        to_rgb(Image.fromarray(np.array([[70000]], np.int32)))
    with pytest.raises(ImageError, match=r"^<bytes>: float \(mode F\) image has values outside \[0, 1\]$"):
        load_image(encode(Image.fromarray(np.array([[2.0]], np.float32)), "TIFF"))


def assert_image_error(source, fragment: str, label: str, **kwargs):
    with pytest.raises(ImageError) as info:
        preprocess(source, ImageConfig.for_vision(32), **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{label}: ") and fragment in message, message
    assert message.count(label) == 1, message  # not wrapped twice


def test_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.jpg"
    assert_image_error(missing, "no such file", str(missing))
    assert_image_error(tmp_path, "cannot read file", str(tmp_path))

    jpeg = encode(textured(64, 64), "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg[: len(jpeg) // 2])
    assert_image_error(truncated, "cannot decode image", str(truncated))
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    assert_image_error(garbage, "not a recognised image format", str(garbage))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert_image_error(empty, "empty file", str(empty))

    assert_image_error(b"", "empty data", "<bytes>")
    assert_image_error(jpeg[:100], "cannot decode image", "record-7.jpg", name="record-7.jpg")
    assert_image_error(Image.new("RGB", (0, 5)), "zero size", "<image>")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for side in (12, 20):  # over the limit (PIL only warns), and over twice the limit (PIL raises)
        path = tmp_path / f"bomb{side}.png"
        path.write_bytes(encode(Image.new("RGB", (side, side))))
        assert_image_error(path, "decompression-bomb limit", str(path))
    assert_image_error(Image.new("RGB", (12, 12)), "decompression-bomb limit", "<image>")


def test_extreme_aspect_ratio_in_crop_mode(monkeypatch):
    strip = textured(1, 300)  # crop mode resizes it to 32x9600 (HF does the same); pad mode to 32x32
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    assert preprocess(strip, ImageConfig.for_vision(32)).shape == (32, 32, 3)
    with pytest.raises(ImageError, match=r"^strip.png: a 1x300 image would be resized to 32x9600, over PIL's"):
        preprocess(strip, ImageConfig.for_vision(32, aspect="crop"), name="strip.png")
