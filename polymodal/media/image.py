"""The image modality: its :class:`~polymodal.modality.ModalitySpec` and codec (Pillow; no torch).

- input: PNG, JPEG, WebP, GIF, BMP, TIFF -> ``uint8 (H, W, 3)`` RGB (:func:`decode_image`).
- output: ``uint8 (H, W, 3)`` -> PNG (:func:`encode_png`).
- edits (``/v1/images/edits``): OpenAI's mask PNG -> bool (H, W) (:func:`decode_edit_mask`); :func:`resize_image`,
  :func:`resize_mask` to the edit's output size.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from polymodal.media_io import (
    DEFAULT_LIMITS,
    DecodeOptions,
    MediaCodec,
    MediaError,
    MediaLimits,
    check_bytes,
    wrong_medium,
)
from polymodal.modality import ModalitySpec, register_modality
from polymodal.types import MediaPart

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""Pillow formats :func:`decode_image` accepts (animated GIF/WebP: the first frame)."""

# A rendered image whose every value is at or below this uint8 level is "all black".
BLACK_LEVEL_U8 = 0
_HEIF_BRANDS = (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis")


def decode_image(data: bytes, limits: MediaLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode an image file to RGB pixels.

    Any Pillow mode is accepted: ``1``/``L``/``P``/``RGB``/``CMYK``/``YCbCr`` convert to RGB; modes with alpha (and
    palettes with a transparent colour) are composited on white; 16-bit ``I;16*``/``I`` keep their top 8 bits. The
    EXIF orientation is applied (``PIL.ImageOps.exif_transpose``); a broken EXIF block is ignored. Animated
    images give their first frame.

    Args:
        data: the encoded file (PNG, JPEG, WebP, GIF, BMP, TIFF).
        limits: ``max_bytes`` and ``max_pixels`` (checked from the header, before decoding).

    Returns:
        uint8 array (H, W, 3).

    Raises:
        MediaError: ``corrupt`` (unreadable or truncated), ``unsupported`` (another medium, an unknown mode),
            ``too_large`` (bytes or pixels).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    check_bytes(IMAGE, data, limits)
    with warnings.catch_warnings():
        # Our own max_pixels check runs before decoding; Pillow's bomb error (2x its own limit) maps to too_large.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(bytes(data)), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as e:
            raise MediaError(IMAGE, "too_large", f"too many pixels ({e})") from None
        except UnidentifiedImageError:
            wrong_medium(IMAGE, data)
            raise MediaError(
                IMAGE, "corrupt",
                f"not a readable image (corrupt, truncated, or not one of {', '.join(IMAGE_FORMATS)})",
            ) from None
        except (OSError, ValueError, SyntaxError, struct.error, EOFError) as e:
            raise MediaError(IMAGE, "corrupt", f"unreadable header ({e})") from None
        width_px, height_px = img.size
        if width_px <= 0 or height_px <= 0:
            raise MediaError(IMAGE, "corrupt", f"invalid size {width_px}x{height_px}")
        if width_px * height_px > limits.max_pixels:
            raise MediaError(
                IMAGE, "too_large",
                f"{width_px}x{height_px} = {width_px * height_px} pixels; the limit is {limits.max_pixels}",
            )
        try:
            img.load()
        except Image.DecompressionBombError as e:
            raise MediaError(IMAGE, "too_large", f"too many pixels ({e})") from None
        except (OSError, ValueError, SyntaxError, struct.error, EOFError, IndexError) as e:
            raise MediaError(IMAGE, "corrupt", f"corrupt or truncated image data ({e})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block only loses the orientation, the pixels are fine
        pass
    if img.width * img.height > limits.max_pixels:  # exif_transpose keeps the pixel count; belt and braces
        raise MediaError(IMAGE, "too_large", f"{img.width}x{img.height} pixels; the limit is {limits.max_pixels}")
    return _to_rgb(img)


def _to_rgb(img) -> np.ndarray:
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.int64)
        gray = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode in ("P", "L", "RGB") and "transparency" in img.info)
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            rgb = img.convert("RGB")
    except (ValueError, OSError) as e:
        raise MediaError(IMAGE, "unsupported", f"cannot convert mode {mode!r} to RGB ({e})") from None
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise MediaError(IMAGE, "unsupported", f"mode {mode!r} gave pixels of shape {arr.shape}")
    return np.ascontiguousarray(arr)


def decode_edit_mask(data: bytes, limits: MediaLimits = DEFAULT_LIMITS) -> np.ndarray:
    """An edit mask in OpenAI's convention (``/v1/images/edits``): a PNG with an alpha channel whose fully
    transparent pixels (alpha 0) mark where the image may change.

    Returns:
        bool (H, W): True where the image may change (the decoders' :class:`polymodal.types.EditSource` mask).

    Raises:
        MediaError: ``corrupt`` (unreadable), ``unsupported`` (not a PNG, or a PNG without alpha), ``too_large``.
    """
    from PIL import Image, UnidentifiedImageError

    check_bytes(IMAGE, data, limits)
    try:
        img = Image.open(io.BytesIO(bytes(data)), formats=("PNG",))
        if img.width * img.height > limits.max_pixels:
            raise MediaError(IMAGE, "too_large", f"{img.width}x{img.height} pixels; the limit is {limits.max_pixels}")
        img.load()
    except UnidentifiedImageError:
        raise MediaError(IMAGE, "unsupported", "a mask must be a PNG (with an alpha channel)") from None
    except (OSError, ValueError, SyntaxError, struct.error, EOFError) as e:
        raise MediaError(IMAGE, "corrupt", f"unreadable PNG ({e})") from None
    if not (img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info):
        raise MediaError(IMAGE, "unsupported", f"the mask has no alpha channel (mode {img.mode!r}): its fully "
                                               "transparent pixels mark where the image may change")
    return np.asarray(img.convert("RGBA"), dtype=np.uint8)[..., 3] == 0


def resize_image(image: np.ndarray, height_px: int, width_px: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (height_px, width_px, 3) (Pillow, bicubic; the same array when the size matches)."""
    from PIL import Image

    if image.shape[:2] == (height_px, width_px):
        return image
    out = Image.fromarray(np.ascontiguousarray(image), mode="RGB").resize((width_px, height_px), Image.BICUBIC)
    return np.asarray(out, dtype=np.uint8)


def resize_mask(mask: np.ndarray, height_px: int, width_px: int) -> np.ndarray:
    """bool (H, W) -> bool (height_px, width_px) (nearest: a mask stays a mask)."""
    from PIL import Image

    if mask.shape == (height_px, width_px):
        return mask
    out = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").resize((width_px, height_px),
                                                                                    Image.NEAREST)
    return np.asarray(out) > 127


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


class ImageCodec(MediaCodec):
    """Image files: Pillow in (:func:`decode_image`), PNG out (:func:`encode_png`)."""

    mime_type = "image/png"
    ext = "png"

    def sniff(self, head: bytes) -> bool:
        return (head.startswith(b"\x89PNG\r\n\x1a\n") or head.startswith(b"\xff\xd8\xff") or head[:4] == b"GIF8"
                or head.startswith(b"BM") or head[:4] in (b"II*\x00", b"MM\x00*")
                or head[:4] == b"RIFF" and head[8:12] == b"WEBP"
                or head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS)

    def decode(self, data: bytes, *, limits: MediaLimits, options: DecodeOptions, name: str | None = None) -> MediaPart:
        return MediaPart(IMAGE, decode_image(data, limits), name=name)

    def validate(self, data: Any, meta: Mapping[str, Any]) -> None:
        if not (data.dtype == np.uint8 and data.ndim == 3 and data.shape[-1] == 3):
            raise ValueError(f"image data must be uint8 (H, W, 3), got {data.dtype} {data.shape}")

    def encode(self, data: Any, meta: Mapping[str, Any]) -> tuple[bytes, str, str]:
        return encode_png(data), self.mime_type, self.ext

    def degenerate(self, data: Any) -> str | None:
        return "all black" if int(data.max(initial=0)) <= BLACK_LEVEL_U8 else None


IMAGE_SPEC = ModalitySpec(
    name="image",
    label="image",
    noun="photo",
    signal_prefix="IMG",
    default_signal_count=4,
    input_markers=("<Image>", "</Image>"),
    content_part="image_url",
    answer_field="images",
    inline_markdown=True,
    input_mime_types=("image/*",),
    file_extensions=(".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"),
    option_fields=("num_inference_steps", "guidance_scale", "height_px", "width_px", "strength",
                   "image_guidance_scale"),
    codec=ImageCodec(),
)
IMAGE = register_modality(IMAGE_SPEC)
