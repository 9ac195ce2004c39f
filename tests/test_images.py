"""handlers.images: the pure Pillow functions that run in the process pool."""

from __future__ import annotations

import io

import pytest
from PIL import ExifTags, Image

from handlers.images import (
    DEFAULT_VARIANTS,
    ImageError,
    Variant,
    make_variants,
    open_image,
    parse_variants,
    prepare_for_ocr,
    sniff_image_type,
)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def one(data: bytes, variant: Variant, **kw: object) -> tuple[Image.Image, dict]:
    made = make_variants(data, [variant], 10_000_000, **kw)  # type: ignore[arg-type]
    (out,) = made["variants"]
    return decode(out["data"]), out


class TestParseVariants:
    def test_defaults(self) -> None:
        """No variants means a 256 px WebP thumb and a 1024 px JPEG medium."""
        assert parse_variants(None) == list(DEFAULT_VARIANTS)
        assert [(v.name, v.width, v.format) for v in DEFAULT_VARIANTS] == [
            ("thumb", 256, "webp"),
            ("medium", 1024, "jpeg"),
        ]

    def test_one_side_gives_a_square_box(self) -> None:
        """A variant with only a width gets a square box; 'jpg' means jpeg."""
        (variant,) = parse_variants([{"name": "s", "width": 300, "format": "jpg"}])
        assert variant == Variant("s", 300, 300, "thumbnail", "jpeg", 80)
        assert variant.extension == "jpg"

    @pytest.mark.parametrize(
        ("raw", "message"),
        [
            ([], "list of 1 to"),
            ("thumb", "list of 1 to"),
            ([{"name": "a/b", "width": 5}], "name"),
            ([{"name": "a", "width": 0}], "width/height"),
            ([{"name": "a", "width": 20_000}], "width/height"),
            ([{"name": "a", "width": 5.5}], "width/height"),
            ([{"name": "a"}], "width/height"),
            ([{"name": "a", "width": 5, "format": "tiff"}], "format"),
            ([{"name": "a", "width": 5, "mode": "stretch"}], "mode"),
            ([{"name": "a", "width": 5, "quality": 101}], "quality"),
            ([{"name": "a", "width": 5, "colour": "red"}], "unknown variant fields"),
            ([{"name": "a", "width": 5}, {"name": "a", "width": 6}], "unique"),
        ],
    )
    def test_rejects(self, raw: object, message: str) -> None:
        """Malformed variant specs raise ImageError saying what is wrong."""
        with pytest.raises(ImageError, match=message):
            parse_variants(raw)


class TestMakeVariants:
    def test_thumbnail_keeps_ratio_and_never_enlarges(self) -> None:
        """thumbnail fits inside the box keeping the aspect ratio, and never upscales."""
        data = encode(Image.new("RGB", (800, 400), "red"), "PNG")
        image, out = one(data, Variant("t", 200, 200, "thumbnail", "png"))
        assert image.size == (200, 100) == (out["width"], out["height"])
        image, _ = one(data, Variant("t", 2000, 2000, "thumbnail", "png"))
        assert image.size == (800, 400)

    def test_fit_crops_to_exact_size(self) -> None:
        """fit covers and crops to exactly the box."""
        data = encode(Image.new("RGB", (800, 400), "red"), "JPEG")
        image, _ = one(data, Variant("f", 120, 90, "fit", "webp"))
        assert (image.format, image.size) == ("WEBP", (120, 90))

    def test_alpha_flattened_on_white_for_jpeg_kept_for_webp(self) -> None:
        """Transparent pixels become white in JPEG and stay transparent in WebP/PNG."""
        source = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
        source.paste((255, 0, 0, 255), (25, 25, 75, 75))
        data = encode(source, "PNG")
        jpeg, _ = one(data, Variant("j", 100, 100, "thumbnail", "jpeg", 95))
        assert jpeg.mode == "RGB"
        assert all(c > 245 for c in jpeg.getpixel((2, 2)))  # type: ignore[union-attr]
        webp, _ = one(data, Variant("w", 100, 100, "thumbnail", "webp", 95))
        assert webp.mode == "RGBA" and webp.getpixel((2, 2))[3] == 0  # type: ignore[index]

    def test_palette_gif_with_transparency(self) -> None:
        """A palette GIF with a transparent colour converts cleanly to PNG with alpha."""
        source = Image.new("P", (40, 40), 0)
        source.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
        data = encode(source, "GIF", transparency=0)
        image, _ = one(data, Variant("p", 20, 20, "thumbnail", "png"))
        assert image.mode == "RGBA" and image.getpixel((1, 1))[3] == 0  # type: ignore[index]

    def test_metadata_stripped_orientation_applied(self) -> None:
        """EXIF (with GPS), XMP and comments are dropped; the EXIF orientation is applied."""
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = 6
        exif[ExifTags.Base.Make] = "SecretCam"
        exif[ExifTags.IFD.GPSInfo] = {ExifTags.GPS.GPSLatitudeRef: "N", ExifTags.GPS.GPSLatitude: (1.0, 2.0, 3.0)}
        xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">SecretXMP</x:xmpmeta>'
        source = encode(Image.new("RGB", (200, 100), "blue"), "JPEG", exif=exif, xmp=xmp, comment=b"SecretNote")
        assert b"SecretXMP" in source and b"SecretNote" in source
        for fmt in ("jpeg", "webp", "png"):
            image, out = one(source, Variant("v", 1000, 1000, "thumbnail", fmt))
            assert image.size == (100, 200)
            assert len(image.getexif()) == 0
            for secret in (b"SecretCam", b"SecretXMP", b"SecretNote", b"Exif\0\0"):
                assert secret not in out["data"], (fmt, secret)

    def test_icc_profile_kept(self) -> None:
        """The ICC colour profile survives re-encoding (it is not personal data)."""
        profile = Image.open(io.BytesIO(encode(Image.new("RGB", (4, 4)), "PNG"))).info.get("icc_profile")
        assert profile is None  # Pillow makes none itself: use a stand-in blob
        fake_icc = b"\0" * 128
        source = encode(Image.new("RGB", (50, 50), "green"), "PNG", icc_profile=fake_icc)
        image, _ = one(source, Variant("v", 10, 10, "thumbnail", "png"))
        assert image.info.get("icc_profile") == fake_icc

    def test_source_description(self) -> None:
        """The result describes the source image as stored."""
        made = make_variants(encode(Image.new("L", (30, 20)), "BMP"), list(DEFAULT_VARIANTS), 10_000)
        assert made["source"] == {"format": "BMP", "width": 30, "height": 20}
        assert [v["name"] for v in made["variants"]] == ["thumb", "medium"]


class TestRefusals:
    def test_pixel_limit(self) -> None:
        """An image above the pixel limit is refused before decoding."""
        data = encode(Image.new("RGB", (200, 200)), "PNG")
        with pytest.raises(ImageError, match=r"decompression bomb.*40000 pixels.*ECOWORKER_MAX_IMAGE_PIXELS"):
            open_image(data, 39_999)
        assert open_image(data, 40_000).size == (200, 200)

    def test_pillow_bomb_error(self) -> None:
        """Far above the limit, Pillow's own DecompressionBombError is reported the same way."""
        data = encode(Image.new("RGB", (300, 300)), "PNG")
        with pytest.raises(ImageError, match="decompression bomb"):
            open_image(data, 10_000)

    @pytest.mark.parametrize(
        "data",
        [b"", b"hello world", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", b"%PDF-1.7\n"],
        ids=["empty", "text", "eps", "pdf"],
    )
    def test_not_an_image(self, data: bytes) -> None:
        """Non-images (and formats that would run Ghostscript) are 'not an image'."""
        with pytest.raises(ImageError, match="not an image"):
            make_variants(data, list(DEFAULT_VARIANTS), 10_000_000)

    def test_truncated(self) -> None:
        """A truncated JPEG is reported as corrupt."""
        data = encode(Image.effect_noise((300, 300), 50).convert("RGB"), "JPEG")
        with pytest.raises(ImageError, match="corrupt or truncated"):
            make_variants(data[: len(data) // 2], list(DEFAULT_VARIANTS), 10_000_000)


def test_prepare_for_ocr_is_upright_greyscale_png() -> None:
    """OCR input is turned upright per EXIF and re-encoded as greyscale PNG."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 8
    image = decode(prepare_for_ocr(encode(Image.new("RGB", (300, 100)), "JPEG", exif=exif), 1_000_000))
    assert (image.format, image.mode, image.size) == ("PNG", "L", (100, 300))


@pytest.mark.parametrize(
    ("fmt", "expected"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"), ("WEBP", "image/webp")]
)
def test_sniff_image_type(fmt: str, expected: str) -> None:
    """The four formats the vision API takes are recognised by their magic numbers."""
    assert sniff_image_type(encode(Image.new("RGB", (8, 8)), fmt)) == expected
    assert sniff_image_type(b"BM" + b"\0" * 40) is None
