"""Image loading and CLIP preprocessing (HF `CLIPImageProcessor` semantics, channels last).

`preprocess(source, cfg)` turns a path, encoded bytes or a PIL image into `float32[size, size, 3]`:

1. decode, apply the EXIF orientation, convert to RGB (`to_rgb`);
2. aspect handling: `pad` pastes the image centred on a square of the mean colour (LLaVA's
   `expand2square`, the stage-2 recipe), `crop` keeps the aspect ratio (stage 1), `resize` squashes;
3. exactly what transformers' `CLIPImageProcessor` (PIL backend) does next: PIL bicubic resize of the
   uint8 image so the short side is `size` (long side `int(size * long / short)`), centre crop at offset
   `(side - size) // 2`, rescale by 1/255 in float64 cast to float32, normalise in float32.

Step 3's rescale and normalise depend only on the uint8 value and the channel, so they are one table
lookup computed with HF's own operation order: the output is bit-identical to HF, without float passes.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import struct

import numpy as np
from PIL import Image, ImageOps

from xllava_jax.errors import UserError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ASPECT_MODES = ("pad", "crop", "resize")

ImageSource = Image.Image | bytes | bytearray | memoryview | str | os.PathLike

# What Pillow raises on corrupt or truncated data (it has no common base class for decode errors).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


class ImageError(UserError):
    """An image that cannot be used; the message is one line: `<file>: <problem>`."""


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """How images become model input.

    size: output side in pixels (the vision tower's `image_size`).
    mean, std: per-channel normalisation (RGB, in [0, 1] units); `pad` fills with `int(255 * mean)`.
    aspect: `pad` (square with the mean colour, then resize), `crop` (short side to `size`, centre
        crop) or `resize` (squash to `size` x `size`).
    """

    size: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    aspect: str = "pad"

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"image size must be a positive int, got {self.size!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or 0.0 in self.std:
            raise ValueError(f"mean and std need 3 values each (std non-zero), got {self.mean} and {self.std}")
        if self.aspect not in ASPECT_MODES:
            raise ValueError(f"aspect must be one of {', '.join(ASPECT_MODES)}, got {self.aspect!r}")

    @classmethod
    def for_vision(cls, image_size: int, aspect: str = "pad") -> ImageConfig:
        """The OpenAI CLIP normalisation at `image_size` (e.g. `VisionConfig.image_size`)."""
        return cls(image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, aspect)

    @property
    def fill(self) -> tuple[int, int, int]:
        """The `pad` background, as LLaVA computes it: `tuple(int(x * 255) for x in mean)`."""
        return tuple(int(x * 255) for x in self.mean)


def _source_name(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return "<image>" if isinstance(source, Image.Image) else "<bytes>"


def _check_size(image: Image.Image, name: str) -> None:
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageError(f"{name}: image has zero size ({width}x{height})")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageError(f"{name}: {width}x{height} image exceeds PIL's decompression-bomb limit of {limit} pixels")


def load_image(source: ImageSource, name: str | None = None) -> Image.Image:
    """Decodes `source` into an RGB PIL image with its EXIF orientation applied (see `to_rgb`).

    `name` labels errors (defaults to the path, `<bytes>` or `<image>`). Raises `ImageError` for a
    missing or unreadable file, undecodable or truncated data, zero size, or more pixels than
    `PIL.Image.MAX_IMAGE_PIXELS` (PIL's decompression-bomb limit).
    """
    name = _source_name(source, name)
    if isinstance(source, Image.Image):
        _check_size(source, name)
        try:
            return to_rgb(ImageOps.exif_transpose(source), name)
        except ImageError:
            raise
        except _DECODE_ERRORS as e:
            raise ImageError(f"{name}: cannot decode image ({e})") from e
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise ImageError(f"{name}: empty data")
        stream = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        try:
            stream = open(source, "rb")  # noqa: SIM115 - closed by the `with` below
        except FileNotFoundError as e:
            raise ImageError(f"{name}: no such file") from e
        except OSError as e:
            raise ImageError(f"{name}: cannot read file ({e.strerror or e})") from e
        if os.fstat(stream.fileno()).st_size == 0:
            stream.close()
            raise ImageError(f"{name}: empty file")
    else:
        raise TypeError(f"expected a path, bytes or a PIL image, got {type(source).__name__}")
    with stream:
        try:
            image = Image.open(stream)
            _check_size(image, name)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            return to_rgb(image, name)
        except ImageError:
            raise
        except Image.DecompressionBombError as e:
            raise ImageError(f"{name}: image exceeds PIL's decompression-bomb limit ({e})") from e
        except Image.UnidentifiedImageError as e:
            raise ImageError(f"{name}: not a recognised image format") from e
        except _DECODE_ERRORS as e:
            raise ImageError(f"{name}: cannot decode image ({e})") from e


def to_rgb(image: Image.Image, name: str = "<image>") -> Image.Image:
    """Converts any PIL mode to RGB the way users expect (uint8[H, W, 3] as a PIL image).

    - Transparency (RGBA, LA, PA, RGBa, P or L with a transparent colour) is composited over white,
      as transformers' `convert_to_rgb` does. A bare `.convert("RGB")` instead drops alpha and shows
      whatever colour transparent pixels hold (often black).
    - I;16* (16-bit) and I (32-bit int holding 16-bit data) are scaled to 8 bits, `round(v / 257)`,
      so 65535 -> 255; PIL's own conversion clips everything above 255 to white. I values outside
      [0, 65535] raise `ImageError`.
    - F (float) is read as [0, 1] intensity, `round(v * 255)`; values outside [0, 1] raise `ImageError`.
    - Grey (L, 1) is replicated to three channels; CMYK, YCbCr and the rest use PIL's conversion.
    """
    if image.mode.startswith("I") or image.mode == "F":
        image = Image.fromarray(_high_depth_to_uint8(np.asarray(image), image.mode, name))
    if image.mode == "RGB":
        return image
    try:
        if image.has_transparency_data:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    except ValueError as e:
        raise ImageError(f"{name}: cannot convert mode {image.mode} to RGB ({e})") from e


def _high_depth_to_uint8(values: np.ndarray, mode: str, name: str) -> np.ndarray:
    """Scales a 16-bit, 32-bit int or float image `[H, W]` to `uint8[H, W]` (see `to_rgb`)."""
    if mode == "F":
        if not np.all((values >= 0) & (values <= 1)):
            raise ImageError(f"{name}: float (mode F) image has values outside [0, 1]")
        return np.rint(values * np.float32(255)).astype(np.uint8)
    if values.min() < 0 or values.max() > 65535:
        raise ImageError(f"{name}: mode {mode} image has values outside the 16-bit range [0, 65535]")
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def expand2square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's `expand2square`: pastes `image` centred (offset `(long - short) // 2`) on a `fill` square."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


@functools.lru_cache(maxsize=16)
def _normalise_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """`float32[3, 256]`: HF's `rescale` (float64 x 1/255, cast to float32) then float32 `normalize`."""
    values = (np.arange(256, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    table = (values - np.array(mean, np.float32)[:, None]) / np.array(std, np.float32)[:, None]
    table.flags.writeable = False
    return table


def preprocess(source: ImageSource, cfg: ImageConfig, name: str | None = None) -> np.ndarray:
    """Path, bytes or PIL image -> `float32[cfg.size, cfg.size, 3]`, normalised, channels last.

    Equal to `CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})`
    (after `expand2square` for `pad`), transposed to channels last. Errors as in `load_image`.
    The two halves, `resize_crop` and `normalise`, let a caller keep the small uint8 image.
    """
    return normalise(resize_crop(source, cfg, name), cfg)


def resize_crop(source: ImageSource, cfg: ImageConfig, name: str | None = None) -> np.ndarray:
    """`preprocess` up to the normalisation: `uint8[cfg.size, cfg.size, 3]` (padded or cropped, resized)."""
    image = load_image(source, name)
    size = cfg.size
    if cfg.aspect == "pad":
        image = expand2square(image, cfg.fill)
    if cfg.aspect == "resize":
        target = (size, size)
    else:
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(size * long / short)  # HF `get_resize_output_image_size`: truncates
        target = (size, new_long) if width <= height else (new_long, size)
        if Image.MAX_IMAGE_PIXELS is not None and size * new_long > Image.MAX_IMAGE_PIXELS:
            raise ImageError(f"{_source_name(source, name)}: a {width}x{height} image would be resized to "
                             f"{target[0]}x{target[1]}, over PIL's decompression-bomb limit; use aspect 'pad'")
    image = image.resize(target, Image.Resampling.BICUBIC)
    left, top = (target[0] - size) // 2, (target[1] - size) // 2
    return np.asarray(image)[top : top + size, left : left + size]


def normalise(pixels: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """`uint8[H, W, 3]` -> `float32[H, W, 3]`: HF's rescale and normalize with `cfg`'s mean and std."""
    table = _normalise_table(cfg.mean, cfg.std)
    out = np.empty(pixels.shape, np.float32)
    for channel in range(3):  # one 1-D gather per channel: ~3x faster than a 2-D fancy index
        out[..., channel] = table[channel][pixels[..., channel]]
    return out
