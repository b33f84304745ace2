"""Image sizes from file headers, without decoding pixels: PNG, JPEG, GIF, BMP and WebP in pure Python.

`image_size(path)` returns (width, height) as PIL's `Image.open(path).size` reports them (the stored size, before any
EXIF rotation: LLaMA-Factory's `_regularize_images` opens images with PIL and does not transpose them). Besides the
header it checks the file's end marker (PNG IEND, JPEG EOI, GIF trailer, the RIFF/BMP sizes), so a truncated
download is reported as corrupt the way PIL would fail on it at training time, still without decoding. Other formats
fall back to PIL's lazy `Image.open(...).size` when PIL is installed. `tests/test_dataset.py` holds the parser equal
to PIL on generated images of every format.

Format references: PNG spec section 11.2.2 (IHDR), ITU T.81 annex B (JPEG markers, SOFn), GIF89a section 18
(logical screen descriptor), Microsoft BITMAPINFOHEADER / BITMAPCOREHEADER, Google "WebP Container Specification"
(VP8 / VP8L / VP8X chunks).
"""

from __future__ import annotations

import struct
from pathlib import Path

from .errors import VlplanError

_HEAD_BYTES = 64 * 1024  # JPEG SOF markers sit after APPn (EXIF) segments; read more on demand
_TAIL_BYTES = 4096


class ImageError(VlplanError):
    """An image file that cannot be read: missing, truncated, corrupt or of an unknown format."""


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file from its header; ImageError when it is unreadable or truncated."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
            size = f.seek(0, 2)
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
            if head.startswith(b"\xff\xd8"):
                return _jpeg(f, tail, path)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory") from None
    except OSError as err:
        raise ImageError(f"{path}: {err.strerror or err}") from None
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(head, tail, path)
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return _gif(head, tail, path)
    if head.startswith(b"BM"):
        return _bmp(head, size, path)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp(head, size, path)
    if not head:
        raise ImageError(f"{path}: empty file")
    return _pil(path)


def _check(condition: bool, path: Path, what: str) -> None:
    if not condition:
        raise ImageError(f"{path}: {what}")


def _positive(width: int, height: int, path: Path) -> tuple[int, int]:
    _check(width > 0 and height > 0, path, f"invalid size {width}x{height} in the header")
    return width, height


def _png(head: bytes, tail: bytes, path: Path) -> tuple[int, int]:
    _check(len(head) >= 24 and head[12:16] == b"IHDR", path, "truncated PNG header (no IHDR chunk)")
    width, height = struct.unpack(">II", head[16:24])
    _check(tail.endswith(b"IEND\xaeB`\x82"), path, "truncated PNG (no IEND chunk at the end)")
    return _positive(width, height, path)


# SOF0..SOF15 carry the frame size, except DHT (C4), JPG (C8) and DAC (CC)
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# markers without a length field: TEM, RST0-7, SOI, EOI
_STANDALONE = frozenset([0x01, *range(0xD0, 0xDA)])


def _jpeg(f, tail: bytes, path: Path) -> tuple[int, int]:
    f.seek(2)
    frame_size = None
    while True:
        byte = f.read(1)
        _check(bool(byte), path, "truncated JPEG (no frame header)" if frame_size is None
               else "truncated JPEG (no scan data)")
        if byte != b"\xff":
            continue  # junk between segments, which PIL skips too
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes
            marker = f.read(1)
        _check(bool(marker), path, "truncated JPEG (no frame header)")
        code = marker[0]
        if code in _STANDALONE:
            _check(code != 0xD9, path, "corrupt JPEG (end of image before the image data)")
            continue
        length_bytes = f.read(2)
        _check(len(length_bytes) == 2, path, "truncated JPEG header")
        (length,) = struct.unpack(">H", length_bytes)
        _check(length >= 2, path, "corrupt JPEG (segment length below 2)")
        if code in _SOF_MARKERS and frame_size is None:
            frame = f.read(5)
            _check(len(frame) == 5, path, "truncated JPEG frame header")
            height, width = struct.unpack(">HH", frame[1:5])
            frame_size = _positive(width, height, path)
            # entropy-coded data never holds FF D9 (FF is stuffed with 00), so EOI near the end means not truncated
            if b"\xff\xd9" in tail:
                return frame_size
            f.seek(length - 7, 1)
            continue
        if code == 0xDA and frame_size is not None:
            # EOI not in the last bytes: data appended after the image (motion photos) or a truncated scan
            _check(_find_after(f, b"\xff\xd9"), path, "truncated JPEG (no end-of-image marker)")
            return frame_size
        f.seek(length - 2, 1)


def _find_after(f, needle: bytes, chunk_bytes: int = 1 << 20) -> bool:
    carry = b""
    while True:
        chunk = f.read(chunk_bytes)
        if not chunk:
            return False
        if needle in carry + chunk:
            return True
        carry = chunk[-(len(needle) - 1):]


def _gif(head: bytes, tail: bytes, path: Path) -> tuple[int, int]:
    _check(len(head) >= 10, path, "truncated GIF header")
    width, height = struct.unpack("<HH", head[6:10])
    _check(tail.endswith(b";"), path, "truncated GIF (no trailer)")
    return _positive(width, height, path)


def _bmp(head: bytes, size: int, path: Path) -> tuple[int, int]:
    _check(len(head) >= 26, path, "truncated BMP header")
    (offset,) = struct.unpack("<I", head[10:14])
    (header_size,) = struct.unpack("<I", head[14:18])
    if header_size == 12:  # OS/2 BITMAPCOREHEADER
        width, height = struct.unpack("<HH", head[18:22])
        planes_bits = head[22:26]
    else:
        _check(len(head) >= 34, path, "truncated BMP header")
        width, height = struct.unpack("<ii", head[18:26])
        planes_bits = head[26:30]
    height = abs(height)  # negative: rows stored top-down
    (bits,) = struct.unpack("<H", planes_bits[2:4])
    compression = struct.unpack("<I", head[30:34])[0] if header_size >= 40 else 0
    if compression in (0, 3) and bits:  # BI_RGB / BI_BITFIELDS: rows padded to 4 bytes
        row_bytes = (width * bits + 31) // 32 * 4
        _check(size >= offset + row_bytes * height, path, "truncated BMP (pixel array shorter than the header says)")
    return _positive(width, height, path)


def _webp(head: bytes, size: int, path: Path) -> tuple[int, int]:
    (riff_size,) = struct.unpack("<I", head[4:8])
    _check(size >= riff_size + 8, path, "truncated WebP (file shorter than its RIFF size)")
    chunk = head[12:16]
    if chunk == b"VP8 ":
        _check(len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a", path, "corrupt WebP (no VP8 frame tag)")
        width, height = struct.unpack("<HH", head[26:30])
        return _positive(width & 0x3FFF, height & 0x3FFF, path)
    if chunk == b"VP8L":
        _check(len(head) >= 25 and head[20] == 0x2F, path, "corrupt WebP (no VP8L signature)")
        (bits,) = struct.unpack("<I", head[21:25])
        return _positive((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, path)
    if chunk == b"VP8X":
        _check(len(head) >= 30, path, "truncated WebP header")
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return _positive(width, height, path)
    raise ImageError(f"{path}: corrupt WebP (unknown chunk {chunk!r})")


def _pil(path: Path) -> tuple[int, int]:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ImageError(f"{path}: not a PNG, JPEG, GIF, BMP or WebP file (install pillow for other formats)") from None
    try:
        with Image.open(path) as image:  # lazy: reads the header only
            return image.size
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file PIL can identify") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path}: {err}") from None
