"""The image decoder: exotic modes become uint8 RGB, bad files one exception, big ones bounded."""
from __future__ import annotations

import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from part_distillation.data.images import BadImageError, ImageInfo, load_rgb, probe_image

W, H = 40, 30


def _check_rgb(array: np.ndarray, width: int = W, height: int = H) -> None:
    assert array.dtype == np.uint8
    assert array.shape == (height, width, 3)
    assert array.flags.c_contiguous and array.flags.writeable


def _noise(seed: int = 0, size=(H, W)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _png_header_only(path, width: int, height: int) -> None:
    """A valid PNG header announcing a huge image, with (almost) no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
                     + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- modes

def test_rgb_jpeg_roundtrip_is_close(tmp_path):
    pixels = np.zeros((H, W, 3), np.uint8)
    pixels[:, : W // 2] = (200, 30, 40)
    pixels[:, W // 2:] = (20, 90, 220)
    Image.fromarray(pixels).save(tmp_path / "a.JPEG", quality=95)
    out = load_rgb(tmp_path / "a.JPEG")
    _check_rgb(out)
    assert np.abs(out[5:-5, 5:10].astype(int) - (200, 30, 40)).max() < 12


def test_grayscale_is_replicated_on_three_channels(tmp_path):
    Image.new("L", (W, H), 77).save(tmp_path / "gray.png")
    out = load_rgb(tmp_path / "gray.png")
    _check_rgb(out)
    assert (out == 77).all()


@pytest.mark.parametrize("mode,fill", [("LA", (77, 0)), ("RGBA", (10, 200, 30, 0))])
def test_transparent_pixels_become_white(tmp_path, mode, fill):
    image = Image.new(mode, (W, H), fill)
    opaque = (77, 255) if mode == "LA" else (10, 200, 30, 255)
    image.paste(opaque, (0, 0, 10, H))  # left strip opaque
    image.save(tmp_path / "t.png")
    out = load_rgb(tmp_path / "t.png")
    _check_rgb(out)
    assert (out[:, 20:] == 255).all()
    expected = (77, 77, 77) if mode == "LA" else (10, 200, 30)
    assert (out[:, :10] == expected).all()


def test_half_transparent_pixels_are_blended_on_white(tmp_path):
    Image.new("RGBA", (W, H), (0, 0, 0, 128)).save(tmp_path / "half.png")
    out = load_rgb(tmp_path / "half.png")
    assert np.all(np.abs(out.astype(int) - 127) <= 1)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (W, H), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # pure red in CMYK
    out = load_rgb(tmp_path / "cmyk.jpg")
    _check_rgb(out)
    r, g, b = out[H // 2, W // 2].astype(int)
    assert r > 230 and g < 25 and b < 25


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.full((H, W), 65535, np.uint16)
    values[0, 0], values[0, 1], values[0, 2] = 0, 32896, 257
    Image.fromarray(values).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    out = load_rgb(tmp_path / "i16.png")
    _check_rgb(out)
    assert tuple(out[0, :3, 0]) == (0, 128, 1)
    assert (out[1:] == 255).all()


@pytest.mark.parametrize("suffix", ["png", "gif"])
def test_palette_with_transparency(tmp_path, suffix):
    image = Image.new("P", (W, H), 1)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(0, (0, 0, 10, H))  # left strip: palette entry 0 (red), rest entry 1 (transparent)
    image.save(tmp_path / f"p.{suffix}", transparency=1)
    out = load_rgb(tmp_path / f"p.{suffix}")
    _check_rgb(out)
    assert (out[:, :10] == (255, 0, 0)).all()
    assert (out[:, 20:] == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((H, W, 3), np.uint8)
    pixels[:, :8] = 255  # white strip on the stored image's left edge
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_rgb(tmp_path / "rot.jpg")
    _check_rgb(out, width=H, height=W)  # width and height swapped
    assert out[:4].mean() > 200 and out[-8:].mean() < 40  # the left edge is now the top


def test_one_bit_and_bmp(tmp_path):
    Image.new("1", (W, H), 1).save(tmp_path / "bw.bmp")
    out = load_rgb(tmp_path / "bw.bmp")
    _check_rgb(out)
    assert (out == 255).all()


# ----------------------------------------------------------------------------- bad files

def _truncated_jpeg(path):
    Image.fromarray(_noise()).save(path.with_suffix(".full.jpg"), quality=95)
    data = path.with_suffix(".full.jpg").read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name,make", [
    ("empty.JPEG", lambda p: p.write_bytes(b"")),
    ("truncated.JPEG", _truncated_jpeg),
    ("random.JPEG", lambda p: p.write_bytes(np.random.default_rng(1).bytes(4000))),
    ("page.JPEG", lambda p: p.write_text("<html><body>404 not found</body></html>")),
])
def test_bad_files_raise_bad_image_error_naming_the_file(tmp_path, name, make):
    path = tmp_path / name
    make(path)
    with pytest.raises(BadImageError) as info:
        load_rgb(path)
    assert info.value.path == str(path)
    assert name in str(info.value)
    assert info.value.reason
    probe = probe_image(path)
    assert probe == ImageInfo(0, 0, False, info.value.reason)


def test_truncated_png_raises(tmp_path):
    Image.fromarray(_noise(size=(64, 64))).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match="truncated"):
        load_rgb(tmp_path / "cut.png")


def test_missing_file_is_not_a_bad_image(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_rgb(tmp_path / "nope.jpg")
    assert not probe_image(tmp_path / "nope.jpg").ok


def test_bad_image_error_survives_pickling():
    error = pickle.loads(pickle.dumps(BadImageError("/x/y.jpg", "truncated")))
    assert (error.path, error.reason, str(error)) == ("/x/y.jpg", "truncated", "/x/y.jpg: truncated")


def test_probe_reports_the_decoded_size(tmp_path):
    Image.fromarray(_noise()).save(tmp_path / "ok.png")
    assert probe_image(tmp_path / "ok.png") == ImageInfo(W, H, True, "")


# ----------------------------------------------------------------------------- size limits

@pytest.fixture()
def large_jpeg(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 1200), (800, 1)).astype(np.uint8)  # dark left, bright right
    path = tmp_path / "large.jpg"
    Image.fromarray(np.stack([ramp, 255 - ramp, ramp], -1)).save(path, quality=90)
    return path


def test_oversize_jpeg_is_downscaled_within_budget(large_jpeg, monkeypatch):
    from PIL import JpegImagePlugin
    drafts = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        drafts.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    out = load_rgb(large_jpeg, max_pixels=50_000)
    assert drafts == [(300, 200)]  # decoded at 1/4 scale, not in full
    assert out.dtype == np.uint8 and out.shape[2] == 3
    assert out.shape[0] * out.shape[1] <= 50_000
    assert out.shape[0] * out.shape[1] > 0.95 * 50_000       # not shrunk more than needed
    assert abs(out.shape[1] / out.shape[0] - 1.5) < 0.02      # aspect kept
    assert out[:, 0, 0].mean() < 30 and out[:, -1, 0].mean() > 225  # the content is the ramp


def test_oversize_png_is_downscaled(tmp_path):
    Image.fromarray(_noise(size=(300, 400))).save(tmp_path / "big.png")
    out = load_rgb(tmp_path / "big.png", max_pixels=12_000)
    assert out.shape[0] * out.shape[1] <= 12_000 and abs(out.shape[1] / out.shape[0] - 4 / 3) < 0.03


def test_oversize_refused_names_the_file(large_jpeg):
    with pytest.raises(BadImageError, match="large.jpg.*exceeds the limit of 50000"):
        load_rgb(large_jpeg, max_pixels=50_000, oversize="refuse")
    assert load_rgb(large_jpeg, max_pixels=None, oversize="refuse").shape == (800, 1200, 3)


def test_decompression_bomb_is_refused_without_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    _png_header_only(path, 40_000, 40_000)  # 1.6 Gpx: would need ~5 GB to decode
    cases = [({}, "max_decode_pixels"), ({"oversize": "refuse"}, "exceeds the limit"),
             ({"max_pixels": None}, "decompression bomb")]
    for kwargs, reason in cases:
        with pytest.raises(BadImageError, match=f"bomb.png.*{reason}"):
            load_rgb(path, **kwargs)
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's global guard is left as it was


def test_undecodable_downscale_is_refused_above_decode_budget(tmp_path):
    Image.fromarray(_noise(size=(300, 400))).save(tmp_path / "big.png")
    with pytest.raises(BadImageError, match="max_decode_pixels"):
        load_rgb(tmp_path / "big.png", max_pixels=1_000, max_decode_pixels=50_000)


def test_bad_arguments():
    with pytest.raises(ValueError):
        load_rgb("x.jpg", oversize="crop")
    with pytest.raises(ValueError):
        load_rgb("x.jpg", max_pixels=0)


# ----------------------------------------------------------------------------- memory bound

def _strip_cases(rng):
    h, w = 90, 130
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    palette = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).quantize(16)
    palette.info["transparency"] = 3
    wide = Image.fromarray(rng.integers(-70_000, 90_000, (h, w)).astype(np.int32))
    return {"RGBA": Image.fromarray(rgba), "P": palette, "I_wide_range": wide,
            "I;16": Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16)),
            "L": Image.fromarray(np.ascontiguousarray(rgba[..., 0]))}


@pytest.mark.parametrize("mode", ["RGBA", "P", "I_wide_range", "I;16", "L"])
@pytest.mark.parametrize("out_size", [(130, 90), (61, 42)])
def test_strips_give_the_same_pixels_as_one_whole_image_conversion(monkeypatch, mode, out_size):
    """Small strips (a few rows) against converting and resizing the whole image at once."""
    from part_distillation.data import images

    img = _strip_cases(np.random.default_rng(1))[mode]
    whole = images._to_rgb(img, "x")  # one conversion, one resize: the definition of the result
    if out_size != img.size:
        whole = whole.resize(out_size, Image.Resampling.BILINEAR)
    monkeypatch.setattr(images, "STRIP_PIXELS", 130 * 7)  # 7 source rows per strip
    strips = images._to_rgb_in_strips(img, out_size, "x")
    assert strips.shape == (out_size[1], out_size[0], 3)
    assert np.abs(strips.astype(int) - np.asarray(whole).astype(int)).max() <= 1


def test_large_image_in_strips_keeps_exif_orientation(tmp_path, monkeypatch):
    from part_distillation.data import images

    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, :30] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif, quality=95)
    monkeypatch.setattr(images, "STRIP_PIXELS", 100)
    out = load_rgb(tmp_path / "r.jpg")
    assert out.shape == (60, 40, 3)
    assert out[:25].mean() > 230 and out[35:].mean() < 25  # the white half is now on top


@pytest.mark.integration
def test_decoding_a_large_rgba_png_stays_within_the_stated_memory_bound(tmp_path):
    """6000x6000 RGBA (144 MB decoded) downscaled to 4 Mpx: peak RSS growth ~ decoded + output + strip."""
    import subprocess
    import sys

    path = tmp_path / "large.png"
    pixels = np.zeros((6000, 6000, 4), np.uint8)
    pixels[..., 0] = (np.arange(6000) % 256)[None, :]
    pixels[..., 3] = 200
    Image.fromarray(pixels).save(path, compress_level=1)
    del pixels
    code = ("import resource, sys\nfrom part_distillation.data.images import load_rgb\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "out = load_rgb(sys.argv[1], max_pixels=4_000_000)\n"
            "print(out.shape[0] * out.shape[1], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    pixels_out, growth_kib = map(int, result.stdout.split())
    decoded = 6000 * 6000 * 4
    bound = decoded + 3 * 4_000_000 + 16 * 4 * 1024 * 1024  # the module notes' bound
    assert 0.99 * 4_000_000 < pixels_out <= 4_000_000
    assert growth_kib * 1024 < bound, (growth_kib / 1024, bound / 2**20)
