"""Image intake: every image entering the project is decoded here into 8-bit grayscale.

Inputs: a file path (`load_gray`) or bytes (`decode_gray_bytes`): JPEG, PNG, BMP, TIFF (modes 1, L,
P, LA, RGB, RGBA, CMYK, I;16*, I, F) or DICOM. Output: a uint8 (H, W) numpy array, or
`ImageRejected` with a machine-friendly `.reason` and a one-line `.detail`. Library module, no
CLI; tested by `.venv/bin/python -m pytest tests/test_imageio.py -q`.

Which decoder runs is decided from the file's BYTES (magic numbers, `sniff_format`), never from
its name: PNG, JPEG, BMP, TIFF and DICOM only (`FORMATS`), and Pillow is opened restricted to the
one plugin sniffed (``Image.open(..., formats=[...])``). Anything else (EPS, PDF, GIF, WebP, text,
whatever it is called) is refused as ``not_an_image`` before any decoder sees it: Pillow's other
readers (Ghostscript for EPS, ...) are never reached. DICOM decoding runs with pydicom's logger
and warnings captured, so a broken file gives a reason, not a traceback on stderr.

Conversion rules (one place, so every source behaves the same):
- colour -> luma (ITU-R 601-2, PIL's "L"); CMYK goes through RGB first.
- alpha (RGBA, LA, P with transparency) is composited on black: X-ray backgrounds are dark, and a
  transparent pixel carries no density information.
- more than 8 bits (I;16, I, F, 16-bit DICOM without VOI): the image's own min..max is mapped
  linearly to 0..255 (a constant image becomes all zeros); float images already in [0, 1] are
  scaled by 255 instead.
- DICOM: modality LUT, then VOI LUT (the LUT sequence if present, else the window) mapped from the
  VOI output range to 0..255; MONOCHROME1 is inverted afterwards; multi-frame -> first frame.
- EXIF orientation is applied.
Images above `max_pixels` are refused from their header, before any pixel is decoded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stages.common.utils import atomic_file

MAX_PIXELS = 100_000_000
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})
# fmt: off
REASONS = ("empty_file", "not_an_image", "corrupt", "truncated", "too_large", "no_pixel_data",
           "unsupported", "too_small")
# fmt: on
# What a broken file can make PIL's plugins raise while reading headers or pixel data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, zlib.error)
# The formats decoded (sniff_format's answers); Pillow opens the first four, pydicom the last.
PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
FORMATS = (*PIL_FORMATS, "DICOM")
HEAD_BYTES = 132  # enough for every magic number below (DICOM's "DICM" sits at 128..131)
_BMP_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})  # BITMAPINFOHEADER variants
# A few formats that are refused, named in the message so a user knows what the file really is.
_KNOWN_OTHERS = (
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS (DOS binary)"),
    (b"%PDF", "PDF"),
    (b"GIF8", "GIF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000 codestream"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"\x1f\x8b", "gzip archive"),
    (b"<?xml", "XML/SVG"),
    (b"<svg", "SVG"),
)
# Catching warnings and re-pointing pydicom's logger change process-wide state: one at a time.
_QUIET_LOCK = threading.Lock()


class ImageRejected(Exception):
    """An input file that cannot become an image; `.reason` is one of `REASONS`."""

    def __init__(self, reason: str, name: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        self.reason = reason
        self.name = name
        self.detail = " ".join(str(detail).split())  # one line, whatever the library said
        detail = self.detail
        super().__init__(f"{name}: {reason.replace('_', ' ')}" + (f" ({detail})" if detail else ""))


def is_candidate(path: str | Path) -> bool:
    """True for files whose suffix says image; macOS resource forks (`._x`, `__MACOSX/`) excluded."""
    path = Path(path)
    if path.name.startswith(".") or "__MACOSX" in path.parts:
        return False
    return path.suffix.lower() in IMAGE_SUFFIXES


def sniff_format(head: bytes) -> str | None:
    """The format the first bytes (``HEAD_BYTES``) announce: one of `FORMATS`, or None.

    DICOM: the "DICM" magic after the 128-byte preamble, or (files written without the preamble)
    a first element of group 0002 (file meta) or 0008 (identifying attributes), little endian.
    """
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    bmp_header = struct.unpack("<I", head[14:18])[0] if len(head) >= 18 else 0
    if head.startswith(b"BM") and bmp_header in _BMP_HEADER_SIZES:
        return "BMP"
    if head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00"):
        return "DICOM"
    return None


def _not_an_image(head: bytes, name: str) -> ImageRejected:
    what = next((kind for magic, kind in _KNOWN_OTHERS if head.startswith(magic)), None)
    what = f"the content is {what}" if what else f"unknown content (first bytes {head[:8]!r})"
    return ImageRejected("not_an_image", name, f"{what}; decoded: {', '.join(FORMATS)}")


def load_gray(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file to uint8 (H, W); raise `ImageRejected` for anything unusable.

    The decoder is chosen from the file's first bytes (`sniff_format`), whatever its name.
    A missing file raises FileNotFoundError (a caller bug, not a data problem).
    """
    path = Path(path)
    name = str(path)
    if path.stat().st_size == 0:
        raise ImageRejected("empty_file", name, "0 bytes")
    with path.open("rb") as fh:
        head = fh.read(HEAD_BYTES)
    return _decode(path, head, name, max_pixels)


def decode_gray_bytes(
    data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Same as `load_gray` for an in-memory file (e.g. an upload); `name` is used in messages."""
    if len(data) == 0:
        raise ImageRejected("empty_file", name, "0 bytes")
    return _decode(io.BytesIO(data), data[:HEAD_BYTES], name, max_pixels)


def _decode(src: Path | io.BytesIO, head: bytes, name: str, max_pixels: int) -> np.ndarray:
    fmt = sniff_format(head)
    if fmt is None:
        raise _not_an_image(head, name)
    if fmt == "DICOM":
        return _decode_dicom(src, name, max_pixels)
    return _decode_pil(src, name, max_pixels, fmt)


def _check_size(width: int, height: int, name: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageRejected(
            "too_large", name, f"{width}x{height} = {width * height} pixels > {max_pixels}"
        )
    if width <= 0 or height <= 0:
        raise ImageRejected("corrupt", name, f"declared size {width}x{height}")


# ----------------------------------------------------------------------------------------- PIL
def _decode_pil(src: Path | io.BytesIO, name: str, max_pixels: int, fmt: str) -> np.ndarray:
    """Pillow restricted to the one plugin of ``fmt`` (sniffed from the bytes)."""
    try:
        # Our own header check below is the real limit; PIL's global guard is left as it is (no
        # process-wide side effect). Its warning (> ~89 MP) is silenced here only because that
        # exact check follows; its error (> ~179 MP) is caught as "too_large".
        with _QUIET_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(src, formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_large", name, str(exc)) from None
    except UnidentifiedImageError:
        raise ImageRejected("corrupt", name, f"{fmt} signature but not a readable {fmt}") from None
    except _DECODE_ERRORS as exc:
        raise ImageRejected("corrupt", name, f"{type(exc).__name__}: {exc}") from None
    with img:
        _check_size(img.width, img.height, name, max_pixels)
        try:
            img.load()  # full decode, so a truncated file fails here and not later
            img = ImageOps.exif_transpose(img)
            return _pil_to_gray(img)
        except Image.DecompressionBombError as exc:
            raise ImageRejected("too_large", name, str(exc)) from None
        except ImageRejected as exc:
            raise ImageRejected(exc.reason, name, exc.detail) from None
        except EOFError as exc:
            raise ImageRejected("truncated", name, f"EOFError: {exc}") from None
        except _DECODE_ERRORS as exc:
            msg = str(exc)
            if "truncated" in msg.lower():
                reason = "truncated"
            elif "not available" in msg or "unsupported" in msg.lower():
                reason = "unsupported"
            else:
                reason = "corrupt"
            raise ImageRejected(reason, name, f"{type(exc).__name__}: {msg}") from None


def _pil_to_gray(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA" if ("transparency" in img.info or mode == "PA") else "RGB")
    elif mode in ("RGBa", "La"):  # premultiplied alpha: un-premultiply first
        img = img.convert("RGBA" if mode == "RGBa" else "LA")
    elif mode == "CMYK":
        img = img.convert("RGB")
    mode = img.mode
    if mode == "L":
        return np.array(img, dtype=np.uint8)
    if mode in ("RGBA", "LA"):
        alpha = np.asarray(img.getchannel("A"), dtype=np.uint16)
        gray = np.asarray(
            img.convert("RGB").convert("L") if mode == "RGBA" else img.getchannel("L")
        )
        # composite on black, rounded: gray * alpha / 255
        return ((gray.astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
    if mode in ("1", "RGB"):
        return np.array(img.convert("L"), dtype=np.uint8)
    if mode.startswith("I") or mode == "F":
        return to_gray_uint8(np.asarray(img))
    try:
        return np.array(img.convert("L"), dtype=np.uint8)
    except ValueError as exc:
        raise ImageRejected("unsupported", "<image>", f"PIL mode {mode}: {exc}") from None


# --------------------------------------------------------------------------------------- arrays
def to_gray_uint8(arr: Any) -> np.ndarray:
    """Any 2D array (or (H, W, 1|3|4) channels-last) -> uint8 (H, W) by the module's rules.

    uint8 passes unchanged; bool -> 0/255; float with all finite values in [0, 1] -> x 255; any
    other dtype -> own min..max mapped to 0..255 (constant -> 0). Non-finite values count as the
    minimum. Colour -> ITU-R 601-2 luma; alpha composited on black.
    """
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
        else:
            alpha = None
            if arr.shape[-1] == 4:
                alpha = _unit_alpha(arr[..., 3])
            rgb = arr[..., :3].astype(np.float64)
            luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
            if alpha is not None:
                luma = luma * alpha
            if arr.dtype == np.uint8:
                return np.clip(np.rint(luma), 0, 255).astype(np.uint8)
            arr = luma
    if arr.ndim != 2:
        raise ValueError(f"expected a 2D image or (H, W, 1|3|4), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"unsupported array dtype {arr.dtype}")
    data = arr.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(arr.shape, np.uint8)
    lo, hi = float(data[finite].min()), float(data[finite].max())
    data[~finite] = lo
    if np.issubdtype(arr.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        return np.rint(data * 255.0).astype(np.uint8)
    return _window(data, lo, hi)


def _window(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map lo..hi linearly to 0..255 (clipped, rounded); a zero-width range gives zeros."""
    if hi <= lo:
        return np.zeros(data.shape, np.uint8)
    out = (data.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _unit_alpha(alpha: np.ndarray) -> np.ndarray:
    if np.issubdtype(alpha.dtype, np.integer):
        return alpha.astype(np.float64) / float(np.iinfo(alpha.dtype).max)
    return np.clip(alpha.astype(np.float64), 0.0, 1.0)


# ---------------------------------------------------------------------------------------- DICOM
class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[list[str]]:
    """pydicom's log records (a decoder failing logs a full traceback at ERROR) and warnings are
    collected instead of reaching stderr; yields the collected log messages."""
    logger = logging.getLogger("pydicom")
    handler = _Collect()
    with _QUIET_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        propagate, logger.propagate = logger.propagate, False
        logger.addHandler(handler)
        try:
            yield handler.messages
        finally:
            logger.removeHandler(handler)
            logger.propagate = propagate


def _decode_dicom(src: Path | io.BytesIO, name: str, max_pixels: int) -> np.ndarray:
    with _quiet_pydicom():
        return _decode_dicom_quietly(src, name, max_pixels)


def _decode_dicom_quietly(src: Path | io.BytesIO, name: str, max_pixels: int) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

    try:
        ds = pydicom.dcmread(src, force=True)
    except InvalidDicomError as exc:
        raise ImageRejected("not_an_image", name, f"not DICOM: {exc}") from None
    except EOFError as exc:
        raise ImageRejected("truncated", name, f"EOFError: {exc}") from None
    except (*_DECODE_ERRORS, KeyError, TypeError) as exc:
        raise ImageRejected("corrupt", name, f"{type(exc).__name__}: {exc}") from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if "SOPClassUID" not in ds and "Rows" not in ds:
            raise ImageRejected("not_an_image", name, "no DICOM image attributes")
        raise ImageRejected("no_pixel_data", name, "DICOM without a Pixel Data element")
    try:
        _check_size(int(ds.Columns), int(ds.Rows), name, max_pixels)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        arr = (
            pixel_array(ds, index=0)
            if int(ds.get("NumberOfFrames", 1) or 1) > 1
            else ds.pixel_array
        )
        if photometric.startswith("MONOCHROME") and arr.ndim == 2:
            arr = apply_modality_lut(arr, ds)
            voi_range = _voi_output_range(ds)
            if voi_range is None:
                gray = to_gray_uint8(arr)
            else:
                gray = _window(apply_voi_lut(arr, ds), *voi_range)
            return 255 - gray if photometric == "MONOCHROME1" else gray
        # colour (pydicom already converted YBR to RGB) or palette
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            arr = apply_color_lut(arr, ds)
        return to_gray_uint8(arr)
    except ImageRejected:
        raise
    except (NotImplementedError, RuntimeError) as exc:
        msg = str(exc)
        # pydicom: every available decoder failed on the data (corrupt), or none is installed
        # for this transfer syntax (unsupported).
        reason = "corrupt" if "exceptions were raised by all" in msg else "unsupported"
        raise ImageRejected(reason, name, f"{type(exc).__name__}: {msg}") from None
    except (*_DECODE_ERRORS, AttributeError, KeyError, TypeError) as exc:
        msg = str(exc)
        reason = "truncated" if ("less than expected" in msg or "truncated" in msg) else "corrupt"
        raise ImageRejected(reason, name, f"{type(exc).__name__}: {msg}") from None


def _voi_output_range(ds: Any) -> tuple[float, float] | None:
    """The value range `apply_voi_lut` maps into, or None when the dataset has no VOI."""
    if ds.get("VOILUTSequence"):
        data = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
        return float(data.min()), float(data.max())
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    # Same output range as pydicom's apply_windowing (PS3.3 C.11.2.1.2).
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        lo, hi = -float(2 ** (int(ds.BitsStored) - 1)), float(2 ** (int(ds.BitsStored) - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return min(lo, hi), max(lo, hi)


# ------------------------------------------------------------------------------ hashing, output
def pixel_sha256(arr: np.ndarray) -> str:
    """sha256 hex of dtype + shape + pixel bytes: identical pixels give the same hash whatever the
    file encoding, a one-pixel change gives another."""
    arr = np.ascontiguousarray(arr)
    digest = hashlib.sha256(f"{arr.dtype.str}{tuple(arr.shape)}".encode())
    digest.update(arr.tobytes())
    return digest.hexdigest()


def save_gray_png(arr: np.ndarray, path: str | Path) -> None:
    """Write a uint8 (H, W) array as an 8-bit grayscale PNG, atomically (``atomic_file``)."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or arr.ndim != 2:
        raise ValueError(f"save_gray_png needs uint8 (H, W), got {arr.dtype} {arr.shape}")
    with atomic_file(path) as tmp:
        Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG")
