"""Pillow work for the handlers, run in the process pool: pure functions, bytes in, bytes out.

Nothing here touches the network, the event loop or the worker's state, so
every function can run in a fresh `spawn`/`forkserver` child. Bad input
raises `ImageError` (a ValueError that pickles cleanly); the calling handler
turns it into a PermanentError.

Safety: only common raster formats are decoded (no EPS/PDF, which would run
Ghostscript); the pixel count is checked from the header before any pixel is
decoded (decompression-bomb guard); EXIF orientation is applied and then all
source metadata (EXIF with GPS, XMP, comments) is dropped unless asked to keep
EXIF. The ICC colour profile is kept: it carries no personal data.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import asdict, dataclass
from typing import Any

# The plugins are imported here, not lazily by Pillow, so the forkserver preloads them.
from PIL import (  # noqa: F401
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

#: Decoders allowed for input; anything else is "not an image".
INPUT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes MPO
#: Output format name → (Pillow format, content type, file extension).
OUTPUT_FORMATS = {
    "webp": ("WEBP", "image/webp", "webp"),
    "jpeg": ("JPEG", "image/jpeg", "jpg"),
    "png": ("PNG", "image/png", "png"),
}
MODES = ("thumbnail", "fit")
MAX_SIDE = 10_000
MAX_VARIANTS = 10
_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")


class ImageError(ValueError):
    """The input is not an image we accept, or a variant spec is wrong; the message says why."""


@dataclass(frozen=True, slots=True)
class Variant:
    """One output image.

    `thumbnail` keeps the aspect ratio inside width x height and never enlarges;
    `fit` crops to exactly width x height (cover).
    """

    name: str
    width: int
    height: int
    mode: str = "thumbnail"
    format: str = "webp"
    quality: int = 80

    @property
    def extension(self) -> str:
        return OUTPUT_FORMATS[self.format][2]


DEFAULT_VARIANTS = (
    Variant("thumb", 256, 256, "thumbnail", "webp", 80),
    Variant("medium", 1024, 1024, "thumbnail", "jpeg", 85),
)


def parse_variants(raw: Any) -> list[Variant]:
    """Validate the task's `variants` argument (None: the defaults)."""
    if raw is None:
        return list(DEFAULT_VARIANTS)
    if not isinstance(raw, list) or not raw or len(raw) > MAX_VARIANTS:
        raise ImageError(f"variants must be a list of 1 to {MAX_VARIANTS} objects")
    variants = [_parse_variant(item) for item in raw]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ImageError(f"variant names must be unique, got {names}")
    return variants


def _parse_variant(item: Any) -> Variant:
    if not isinstance(item, dict):
        raise ImageError(f"a variant must be an object, got {item!r:.80}")
    unknown = set(item) - {"name", "width", "height", "mode", "format", "quality"}
    if unknown:
        raise ImageError(f"unknown variant fields {sorted(unknown)}")
    name = item.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ImageError(f"variant name {name!r:.80} must be 1-64 of [A-Za-z0-9_-]")
    width: Any = item.get("width", item.get("height"))
    height: Any = item.get("height", width)  # one side given: a square box
    if not (_is_side(width) and _is_side(height)):
        raise ImageError(f"variant {name}: width/height must be integers 1..{MAX_SIDE}")
    fmt = str(item.get("format", "webp")).lower().replace("jpg", "jpeg")
    if fmt not in OUTPUT_FORMATS:
        raise ImageError(f"variant {name}: format {fmt!r} is not one of {sorted(OUTPUT_FORMATS)}")
    mode = item.get("mode", "thumbnail")
    if mode not in MODES:
        raise ImageError(f"variant {name}: mode {mode!r} is not one of {list(MODES)}")
    quality = item.get("quality", 80)
    if type(quality) is not int or not 1 <= quality <= 100:
        raise ImageError(f"variant {name}: quality must be an integer 1..100")
    return Variant(name, width, height, mode, fmt, quality)


def _is_side(value: Any) -> bool:
    return type(value) is int and 1 <= value <= MAX_SIDE


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open (not decode) `data`, refusing non-images and images above `max_pixels`."""
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own guard, per process
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
        except UnidentifiedImageError:
            raise ImageError(f"not an image (or not one of {', '.join(INPUT_FORMATS)})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"decompression bomb refused: {exc} (ECOWORKER_MAX_IMAGE_PIXELS)") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"decompression bomb refused: the image is {width}x{height} = {width * height} "
            f"pixels, above the {max_pixels}-pixel limit (ECOWORKER_MAX_IMAGE_PIXELS)"
        )
    return image


def _decode(image: Image.Image, largest_side: int | None) -> Image.Image:
    """Decode pixels (JPEG at a reduced scale when that still covers `largest_side`),
    then apply the EXIF orientation."""
    if largest_side is not None:
        image.draft(image.mode, (largest_side, largest_side))  # no-op for non-JPEG
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"the image is corrupt or truncated: {exc}") from None


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def _convert(image: Image.Image, pil_format: str) -> Image.Image:
    """`image` in a mode the output format can store; alpha is flattened on white for JPEG."""
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        if pil_format != "JPEG":
            return rgba
        flat = Image.new("RGB", rgba.size, "white")
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if image.mode in ("RGB", "L"):
        return image
    return image.convert("RGB")


def _resize(image: Image.Image, variant: Variant) -> Image.Image:
    box = (variant.width, variant.height)
    if variant.mode == "fit":
        return ImageOps.fit(image, box, Image.Resampling.LANCZOS)
    width, height = image.size
    ratio = min(box[0] / width, box[1] / height, 1.0)  # never enlarge
    size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
    if size == image.size:
        return image.copy()
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _encode(image: Image.Image, variant: Variant, icc: bytes | None, exif: bytes | None) -> bytes:
    pil_format = OUTPUT_FORMATS[variant.format][0]
    image.info = {}  # nothing from the source rides along unless passed below
    params: dict[str, Any] = {}
    if icc:
        params["icc_profile"] = icc
    if exif:
        params["exif"] = exif
    if pil_format == "JPEG":
        params.update(quality=variant.quality, optimize=True, progressive=True)
    elif pil_format == "WEBP":
        params.update(quality=variant.quality, method=4)
    buffer = io.BytesIO()
    image.save(buffer, pil_format, **params)
    return buffer.getvalue()


def make_variants(data: bytes, variants: list[Variant], max_pixels: int, strip_exif: bool = True) -> dict[str, Any]:
    """Resize and re-encode `data` into each variant.

    Returns `{"source": {format, width, height}, "variants": [{name, width,
    height, format, content_type, extension, data}]}`.
    """
    image = open_image(data, max_pixels)
    source = {"format": image.format, "width": image.width, "height": image.height}
    icc = image.info.get("icc_profile")
    largest = max(max(v.width, v.height) for v in variants)
    decoded = _decode(image, largest)  # both sides >= largest also covers "fit" crops
    exif = None if strip_exif else decoded.getexif().tobytes() or None
    converted: dict[str, Image.Image] = {}
    outputs = []
    for variant in variants:
        pil_format, content_type, extension = OUTPUT_FORMATS[variant.format]
        if pil_format not in converted:
            converted[pil_format] = _convert(decoded, pil_format)
        resized = _resize(converted[pil_format], variant)
        encoded = _encode(resized, variant, icc, exif)
        outputs.append(
            asdict(variant)
            | {
                "width": resized.width,
                "height": resized.height,
                "content_type": content_type,
                "extension": extension,
                "data": encoded,
            }
        )
    return {"source": source, "variants": outputs}


def prepare_for_ocr(data: bytes, max_pixels: int) -> bytes:
    """`data` upright (EXIF orientation applied), greyscale, as PNG: what tesseract reads best."""
    image = _decode(open_image(data, max_pixels), None)
    grey = image.convert("L")
    buffer = io.BytesIO()
    grey.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def sniff_image_type(data: bytes) -> str | None:
    """The content type of PNG/JPEG/GIF/WebP bytes from their magic number, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None
