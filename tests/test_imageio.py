"""Image intake: every supported input becomes uint8 (H, W); every bad input gets its exact reason."""

from __future__ import annotations

import io
import logging
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.common.imageio import (
    FORMATS,
    MAX_PIXELS,
    ImageRejected,
    decode_gray_bytes,
    is_candidate,
    load_gray,
    pixel_sha256,
    save_gray_png,
    sniff_format,
    to_gray_uint8,
)

RAMP = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (32, 1))  # (32, 64), left dark -> right bright


def _save(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    img.save(path, format=fmt, **kw)
    return path


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _rejected(path: Path, **kw) -> str:
    with pytest.raises(ImageRejected) as info:
        load_gray(path, **kw)
    assert path.name in str(info.value)
    return info.value.reason


# ----------------------------------------------------------------------------------- good inputs
def test_l_and_rgb_ramp(tmp_path):
    gray = load_gray(_save(Image.fromarray(RAMP), tmp_path / "l.png"))
    assert gray.dtype == np.uint8 and gray.shape == RAMP.shape
    np.testing.assert_array_equal(gray, RAMP)
    rgb = np.stack([RAMP, RAMP, RAMP], -1)
    out = load_gray(_save(Image.fromarray(rgb), tmp_path / "rgb.bmp"))
    np.testing.assert_array_equal(out, RAMP)
    jpg = load_gray(_save(Image.fromarray(rgb), tmp_path / "rgb.JPEG", "JPEG", quality=95))
    assert jpg.shape == RAMP.shape and np.abs(jpg.astype(int) - RAMP).max() <= 6


def test_rgba_and_la_composited_on_black(tmp_path):
    white = np.full((4, 3), 200, np.uint8)
    alpha = np.array([0, 128, 255], np.uint8)[None, :].repeat(4, 0)
    rgba = np.dstack([white, white, white, alpha])
    out = load_gray(_save(Image.fromarray(rgba), tmp_path / "rgba.png"))
    np.testing.assert_array_equal(out[0], [0, 100, 200])
    la = Image.merge("LA", [Image.fromarray(white), Image.fromarray(alpha)])
    np.testing.assert_array_equal(load_gray(_save(la, tmp_path / "la.png"))[0], [0, 100, 200])


def test_palette_one_bit_and_cmyk(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    out = load_gray(_save(pal, tmp_path / "p.png"))
    np.testing.assert_array_equal(out, [[76, 29]])  # luma of pure red / pure blue
    bits = Image.fromarray(np.eye(8, dtype=bool))
    assert bits.mode == "1"
    np.testing.assert_array_equal(load_gray(_save(bits, tmp_path / "b.png")), np.eye(8) * 255)
    cmyk = Image.fromarray(np.stack([RAMP] * 3, -1)).convert("CMYK")
    out = load_gray(_save(cmyk, tmp_path / "cmyk.jpg", "JPEG", quality=95))
    assert np.abs(out.astype(int) - RAMP).max() <= 6


@pytest.mark.parametrize(
    ("dtype", "fmt"),
    [(np.uint16, "PNG"), (">u2", "TIFF"), (np.int32, "TIFF"), (np.float32, "TIFF")],
)
def test_high_bit_depth_windowed_to_own_range(tmp_path, dtype, fmt):
    arr = np.linspace(1000, 40000, 64 * 8).reshape(8, 64).astype(dtype)
    img = Image.fromarray(arr)
    assert img.mode in ("I;16", "I;16B", "I", "F")
    out = load_gray(_save(img, tmp_path / f"hi.{fmt.lower()}", fmt))
    assert out.dtype == np.uint8 and out.shape == (8, 64)
    assert out.min() == 0 and out.max() == 255 and out[0, 0] == 0 and out[-1, -1] == 255
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)  # monotone mapping
    assert abs(int(out.ravel()[out.size // 2]) - 128) <= 2


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((10, 20), np.uint8)
    arr[:, :5] = 255  # bright left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    out = load_gray(_save(Image.fromarray(arr), tmp_path / "o.jpg", "JPEG", exif=exif, quality=95))
    assert out.shape == (20, 10)
    assert out[:5].mean() > 200 and out[-5:].mean() < 50  # the left edge is now on top


def test_decode_bytes_matches_file(tmp_path):
    path = _save(Image.fromarray(RAMP), tmp_path / "x.png")
    np.testing.assert_array_equal(decode_gray_bytes(path.read_bytes(), "x.png"), load_gray(path))


# ----------------------------------------------------------------------------------------- DICOM
def _dicom(path: Path, arr: np.ndarray | None, photometric: str = "MONOCHROME2", **extra) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PhotometricInterpretation = photometric
    rgb = photometric == "RGB"
    shape = arr.shape if arr is not None else (4, 4)
    ds.Rows, ds.Columns = shape[-3:-1] if rgb else shape[-2:]
    ds.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        ds.PlanarConfiguration = 0
    bits = 8 if arr is not None and arr.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = (
        bits,
        12 if bits == 16 else 8,
        (11 if bits == 16 else 7),
    )
    ds.PixelRepresentation = 0
    for key, value in extra.items():
        setattr(ds, key, value)
    if arr is not None:
        if arr.ndim == (4 if rgb else 3):
            ds.NumberOfFrames = arr.shape[0]
        ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


GRAD = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (8, 1))  # (8, 64) 0..4032 left -> right


def test_dicom_monochrome2_and_1(tmp_path):
    m2 = load_gray(_dicom(tmp_path / "m2.dcm", GRAD))
    assert m2.shape == GRAD.shape and m2.dtype == np.uint8
    assert m2[0, 0] == 0 and m2[0, -1] == 255 and np.all(np.diff(m2[0].astype(int)) > 0)
    m1 = load_gray(_dicom(tmp_path / "m1", GRAD, "MONOCHROME1"))  # found by "DICM" magic
    np.testing.assert_array_equal(m1, 255 - m2)
    assert m1[0, 0] == 255 and m1[0, -1] == 0  # low values are bright in MONOCHROME1


def test_dicom_voi_window_applied(tmp_path):
    out = load_gray(_dicom(tmp_path / "w.dcm", GRAD, WindowCenter=2048, WindowWidth=1024))
    col = {int(v): i for i, v in enumerate(GRAD[0])}
    assert out[0, col[1024]] == 0 and out[0, col[1472]] == 0  # below the window
    assert out[0, col[2624]] == 255 and out[0, col[4032]] == 255  # above it
    assert abs(int(out[0, col[2048]]) - 128) <= 2  # window centre lands mid-grey


def test_dicom_rescale_then_window(tmp_path):
    # Stored 0..4032, slope 1 intercept -1024 -> HU -1024..3008; window [-500, 500] in HU
    path = _dicom(tmp_path / "r.dcm", GRAD, RescaleSlope=1, RescaleIntercept=-1024,
                  WindowCenter=0, WindowWidth=1000)  # fmt: skip
    out = load_gray(path)
    col = {int(v): i for i, v in enumerate(GRAD[0])}
    assert out[0, col[0]] == 0 and out[0, col[2048]] == 255
    assert abs(int(out[0, col[1024]]) - 128) <= 2  # HU 0 = window centre


def test_dicom_multiframe_first_frame_and_rgb(tmp_path):
    frames = np.stack([GRAD, GRAD[:, ::-1]])
    out = load_gray(_dicom(tmp_path / "mf.dcm", frames))
    assert out.shape == GRAD.shape and out[0, 0] == 0 and out[0, -1] == 255
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    np.testing.assert_array_equal(load_gray(_dicom(tmp_path / "rgb.dcm", rgb, "RGB")), 76)


def test_dicom_without_pixels(tmp_path):
    assert _rejected(_dicom(tmp_path / "np.dcm", None)) == "no_pixel_data"


# ------------------------------------------------------------------------------------ bad inputs
def _huge_png(width: int, height: int) -> bytes:
    data = bytearray(_png_bytes(np.zeros((2, 2), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)  # IHDR width/height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC over type + data
    return bytes(data)


@pytest.mark.parametrize("side", [12_000, 20_000])  # 144 MP (our check), 400 MP (PIL's guard too)
def test_decompression_bomb_refused_from_header(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_huge_png(side, side))
    assert path.stat().st_size < 200
    assert _rejected(path) == "too_large"


def test_max_pixels_parameter(tmp_path):
    path = _save(Image.fromarray(RAMP), tmp_path / "x.png")
    assert _rejected(path, max_pixels=RAMP.size - 1) == "too_large"
    assert load_gray(path, max_pixels=RAMP.size).shape == RAMP.shape
    assert MAX_PIXELS == 100_000_000


def test_bad_inputs_exact_reasons(tmp_path):
    cases: dict[str, tuple[bytes, str]] = {}
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG")
    jpg, png = buf.getvalue(), _png_bytes(noise)
    broken = bytearray(png)
    broken[len(png) // 2] ^= 0xFF  # flips a byte inside IDAT: CRC check fails
    cases = {
        "empty.png": (b"", "empty_file"),
        "text.png": (b"this is not a picture\n" * 5, "not_an_image"),
        "noise.jpg": (np.random.default_rng(1).bytes(4096), "not_an_image"),
        "cut.jpg": (jpg[: len(jpg) // 2], "truncated"),
        "cut.png": (png[: len(png) // 2], "truncated"),
        "flipped.png": (bytes(broken), "corrupt"),
        "junk.dcm": (b"not dicom at all", "not_an_image"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert _rejected(path) == reason, name
        with pytest.raises(ImageRejected) as info:
            decode_gray_bytes(data, name)
        assert info.value.reason == reason and name in str(info.value)


# ------------------------------------------------------------- formats: decided by the bytes
def _encoded(fmt: str, arr: np.ndarray = RAMP) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "name"),
    [("EPS", "scan.png"), ("EPS", "scan.dcm"), ("PDF", "scan.jpg"), ("GIF", "scan.png")]
    + [("WEBP", "scan.tif"), ("PPM", "scan.bmp")],
)
def test_other_formats_refused_whatever_the_name(tmp_path, monkeypatch, fmt, name):
    """A real EPS (PDF, GIF...) file, named like an image, never reaches a Pillow reader."""
    from PIL import EpsImagePlugin

    def no_ghostscript(*args, **kwargs):
        raise AssertionError("Pillow's Ghostscript reader was reached")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    opened: list[object] = []
    real_open = Image.open

    def spy_open(fp, mode="r", formats=None):
        opened.append(formats)
        return real_open(fp, mode, formats)

    monkeypatch.setattr(Image, "open", spy_open)
    data = _encoded(fmt)
    path = tmp_path / name
    path.write_bytes(data)
    assert sniff_format(data) is None
    assert _rejected(path) == "not_an_image"
    with pytest.raises(ImageRejected) as info:
        decode_gray_bytes(data, name)
    assert info.value.reason == "not_an_image" and "\n" not in str(info.value)
    assert opened == []  # refused before Pillow (or pydicom) was asked at all
    if fmt == "EPS":
        assert "PostScript/EPS" in info.value.detail


def test_eps_refused_in_a_fresh_process(tmp_path):
    """The same without monkeypatching: an EPS named .png gives not_an_image and no output."""
    path = tmp_path / "x.png"
    path.write_bytes(_encoded("EPS"))
    code = (
        "import sys; from stages.common.imageio import load_gray, ImageRejected\n"
        "try:\n    load_gray(sys.argv[1])\nexcept ImageRejected as e:\n    print(e.reason)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "not_an_image", "")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF"])
def test_supported_formats_decoded_from_bytes_not_name(tmp_path, fmt):
    data = _encoded(fmt)
    assert sniff_format(data) == fmt and fmt in FORMATS
    path = tmp_path / "misnamed.dcm"  # the name says DICOM, the bytes say otherwise
    path.write_bytes(data)
    out = load_gray(path)
    assert out.shape == RAMP.shape
    if fmt != "JPEG":
        np.testing.assert_array_equal(out, RAMP)


def test_dicom_found_by_bytes_whatever_the_name(tmp_path):
    path = _dicom(tmp_path / "scan.png", GRAD)  # a DICOM named .png
    assert sniff_format(path.read_bytes()[:132]) == "DICOM"
    assert load_gray(path).shape == GRAD.shape


def test_signature_without_a_valid_file_is_corrupt(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    assert _rejected(path) == "corrupt"


def _garbage_jpeg2000_dicom(path: Path) -> Path:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    ds = _dicom_dataset(64, 64)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = encapsulate([b"\xffO\xffQ" + bytes(range(256)) * 4])  # a J2K marker, junk
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def _dicom_dataset(rows: int, cols: int):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows, cols
    return ds


def test_garbage_jpeg2000_dicom_refused_quietly(tmp_path, caplog, capfd):
    path = _garbage_jpeg2000_dicom(tmp_path / "j2k.dcm")
    handlers = list(logging.getLogger("pydicom").handlers)
    with caplog.at_level(logging.DEBUG):
        assert _rejected(path) == "corrupt"
    assert caplog.records == []  # pydicom's traceback never reached the logging tree
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert logging.getLogger("pydicom").propagate  # the logger is given back as it was
    assert logging.getLogger("pydicom").handlers == handlers


def test_garbage_jpeg2000_dicom_stderr_stays_clean(tmp_path):
    """In a process whose logging prints everything (as the stages' run_cli sets it up)."""
    path = _garbage_jpeg2000_dicom(tmp_path / "j2k.dcm")
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO)\n"
        "from stages.common.imageio import load_gray, ImageRejected\n"
        "try:\n    load_gray(sys.argv[1])\nexcept ImageRejected as e:\n"
        "    print(e.reason, '\\n' in e.detail)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "corrupt False"
    assert done.stderr == ""


# -------------------------------------------------------------------------- hashing and writing
def test_pixel_sha256_ignores_encoding(tmp_path):
    arr = np.random.default_rng(2).integers(0, 256, (40, 30), dtype=np.uint8)
    a = tmp_path / "a.png"
    save_gray_png(arr, a)
    b = _save(Image.open(a), tmp_path / "b.png", "PNG", compress_level=9)
    c = _save(Image.open(a), tmp_path / "c.bmp", "BMP")
    assert a.read_bytes() != b.read_bytes()
    hashes = {pixel_sha256(load_gray(p)) for p in (a, b, c)}
    assert hashes == {pixel_sha256(arr)}
    changed = arr.copy()
    changed[5, 5] ^= 1
    assert pixel_sha256(changed) != pixel_sha256(arr)
    assert pixel_sha256(arr.reshape(30, 40)) != pixel_sha256(arr)  # same bytes, other shape


def test_save_gray_png_atomic_roundtrip(tmp_path):
    path = tmp_path / "deep" / "er" / "x.png"
    save_gray_png(RAMP, path)
    with Image.open(path) as img:
        assert img.mode == "L" and img.format == "PNG"
    np.testing.assert_array_equal(load_gray(path), RAMP)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temp file left
    with pytest.raises(ValueError):
        save_gray_png(RAMP.astype(np.float32), tmp_path / "f.png")
    assert not (tmp_path / "f.png").exists()


def test_to_gray_uint8_rules():
    np.testing.assert_array_equal(to_gray_uint8(np.array([[0.0, 0.5, 1.0]])), [[0, 128, 255]])
    np.testing.assert_array_equal(to_gray_uint8(np.array([[-5, 0, 5]], np.int16)), [[0, 128, 255]])
    np.testing.assert_array_equal(to_gray_uint8(np.array([[True, False]])), [[255, 0]])
    np.testing.assert_array_equal(to_gray_uint8(np.full((2, 2), 7, np.int32)), 0)
    assert to_gray_uint8(RAMP[..., None]).shape == RAMP.shape
    np.testing.assert_array_equal(to_gray_uint8(np.stack([RAMP] * 3, -1)), RAMP)
    with pytest.raises(ValueError):
        to_gray_uint8(np.zeros((2, 2, 2, 2)))


def test_is_candidate():
    assert is_candidate("a/b/IM-0001.JPEG") and is_candidate("x.dcm") and is_candidate("y.tiff")
    assert not is_candidate("a/._IM-0001.jpeg")  # macOS resource fork
    assert not is_candidate("__MACOSX/chest_xray/x.jpeg")
    assert not is_candidate("notes.txt") and not is_candidate("labels.csv")


# ------------------------------------------------------------------------------------ real files
def test_real_files(shared_data):
    jpeg = next((shared_data / "kermany224" / "train" / "NORMAL").glob("*.jpeg"))
    png = next((shared_data / "nih14_bbox" / "images").glob("*.png"))
    for path in (jpeg, png):
        arr = load_gray(path)
        assert arr.dtype == np.uint8 and arr.ndim == 2 and min(arr.shape) >= 28
        assert arr.std() > 5  # a real radiograph, not a flat field
