"""Raw dataset readers: the ImageNet (ILSVRC2012) folder layout and Fashion-MNIST IDX files (as they are,
or drawn into larger scenes: `pipeline.shards.scenes`).

A source lists a split on the driver (cheap: names and labels only) and turns one listed item into
the bytes that go into a shard inside a Ray task (`prepare`). Listing never reads image data, so a
1.28M-image ImageNet train split lists in seconds; everything that can fail per file happens in
`prepare`, which raises `SkipSample` with a reason instead of crashing the shard.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.shards.scenes import SceneSettings, render_scene, scene_params

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# Fashion-MNIST's test set (t10k) is our val split: the dataset has no separate validation set.
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Quality 100 keeps the 28x28 grayscale images visually lossless (mean abs error < 1 grey level)
# while staying JPEG, which is what the DALI decoder and the shard contract expect.
FASHION_MNIST_JPEG_QUALITY = 100
REPAIR_JPEG_QUALITY = 95
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
EXIF_ORIENTATION = 0x0112
_WNID = re.compile(r"n\d{8}")
_SPECIAL = {"FIFO": stat.S_ISFIFO, "socket": stat.S_ISSOCK, "character device": stat.S_ISCHR,
            "block device": stat.S_ISBLK, "folder": stat.S_ISDIR}


class SourceError(Exception):
    """The dataset as a whole cannot be read (missing root, no images, unknown split)."""


class SkipSample(Exception):
    """One input cannot be stored; the message is the reason recorded in the manifest."""


_OBJECT_REPR = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")


def error_reason(e: BaseException) -> str:
    """`Type: message` of an exception, made reproducible for manifests: object reprs with memory
    addresses (PIL's "cannot identify image file <_io.BytesIO object at 0x7f...>") and bare addresses
    are dropped, so two runs over the same input write the same bytes."""
    text = _ADDRESS.sub("0x?", _OBJECT_REPR.sub("", str(e))).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@dataclass(frozen=True)
class Item:
    """One listed input: `source` is its path relative to the dataset root (for the manifest)."""

    key: str
    label: int
    source: str
    meta: dict = field(default_factory=dict)


@dataclass
class Listing:
    classes: list[str]
    items: list[Item]
    skipped: list[dict] = field(default_factory=list)  # {source, reason}: seen but not listable
    warnings: list[str] = field(default_factory=list)
    class_names: list[str] | None = None


@dataclass
class Prepared:
    """What `prepare` returns: stored image bytes and their size; `repaired` names what was fixed."""

    jpg: bytes
    width: int
    height: int
    repaired: str | None = None


# Inputs that could exhaust a shard task or a later reader are refused before they are read or decoded:
# a file over MAX_FILE_BYTES is not read (ImageNet's largest is ~15 MB); an image whose header declares
# more than MAX_PIXELS (~8700x5800) is not stored as is: a tiny file can declare 12000x12000, which costs
# ~1.1 GB to decode in every reader. With --max-side a JPEG over the cap is downscaled by the decoder
# itself (DCT scaling, so the full size is never held in memory); without it, it is skipped. These are the
# defaults; the shard job's --max-file-mb and --max-megapixels set others.
MAX_FILE_BYTES = 64 * 2**20
MAX_PIXELS = 50_000_000
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Modes PIL resizes with the filter asked for (palette and 1-bit images are resized by nearest neighbour,
# 16-bit ones not at all): an image in another mode is made RGB first.
_RESAMPLED_MODES = ("RGB", "RGBA", "L", "LA", "CMYK", "YCbCr")
_JPEG_FORMATS = ("JPEG", "MPO")  # (PIL's JPEG plugin opens a JPEG with a second image, a phone's MPO, as MPO)
# The formats an input may be in, for the shard job and the served model alike: no other Pillow plugin
# (EPS, which runs Ghostscript, PSD, ICO, ... ~40 of them) ever parses a file's or a request's bytes. GIF
# and TIFF give their first frame or page.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
_SIMPLEJPEG_SPACE = {"Gray": "GRAY", "CMYK": "CMYK", "YCCK": "CMYK"}
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the turn that displays it (ImageOps.exif_transpose's)

MAX_KEY = 80  # tar (USTAR) member names hold <= 100 bytes: key + "." + the longest extension ("json")


def safe_key(stem: str) -> str:
    """A webdataset key for a file stem: no dots (DALI splits the extension at the first dot), ASCII
    letters, digits, '_' and '-' only, and at most MAX_KEY characters (a longer stem keeps its first 60
    and a digest of the whole stem; the original path stays in the sample's json)."""
    key = _KEY_UNSAFE.sub("_", stem)
    if len(key) > MAX_KEY:
        key = f"{key[:60]}-{hashlib.sha1(stem.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"
    return key


def _encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 95 else 2)
    return buf.getvalue()


def _fit_max_side(img: Image.Image, max_side: int | None) -> Image.Image:
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return img


# JPEG markers the header-only path accepts (anything else goes to PIL, which decides as before):
# SOF0-2 (baseline, extended sequential, progressive: the frames every decoder handles), DHT, DQT, DRI,
# COM, and application segments other than APP1 (EXIF or XMP: either may carry an orientation).
_SOF_PLAIN = (0xC0, 0xC1, 0xC2)
_SKIPPED_SEGMENTS = frozenset([0xC4, 0xDD, 0xFE, 0xE0, *range(0xE2, 0xF0)])


def plain_jpeg_size(data: bytes, channels: tuple[int, ...] = (3,)) -> tuple[int, int] | None:
    """(width, height) of a JPEG whose header alone settles that it is stored as is, read without PIL;
    None when PIL must look (any marker, segment or value this does not know to be plain).

    Accepted: SOI, then well-formed segments up to the first scan, one 8-bit SOF0/1/2 frame with
    `channels` components and a non-zero size, no APP1 (EXIF/XMP: an orientation), no MPF (PIL opens
    such a file as MPO), and every segment that PIL's JPEG reader parses (JFIF, Adobe, Photoshop,
    quantisation tables) long enough for it not to refuse the file. For those files PIL reports the
    same format, mode and size and no orientation (a test compares the two on mutated headers); this
    costs about a tenth of opening the file with PIL."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8 or data[2] != 0xFF:
        return None
    pos, size = 2, None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        m = data[pos + 1]
        length = (data[pos + 2] << 8) | data[pos + 3]
        end = pos + 2 + length
        if length < 2 or end > n:
            return None
        if m == 0xDA:  # start of scan: the header is complete
            return size
        if m in _SOF_PLAIN:
            if size is not None or length < 8:
                return None
            bits, h, w, comps = data[pos + 4], (data[pos + 5] << 8) | data[pos + 6], \
                (data[pos + 7] << 8) | data[pos + 8], data[pos + 9]
            if bits != 8 or comps not in channels or w == 0 or h == 0 or length != 8 + 3 * comps:
                return None
            size = (w, h)
        elif m == 0xDB:  # quantisation tables: PIL refuses a segment that does not hold whole tables
            t = pos + 4
            while t < end:
                if data[t] >> 4 > 1 or data[t] & 15 > 3:  # (8- or 16-bit tables 0-3 only)
                    return None
                t += 1 + (64 if data[t] < 16 else 128)
            if t != end:
                return None
        elif m not in _SKIPPED_SEGMENTS:
            return None
        else:
            payload = data[pos + 4:min(end, pos + 4 + 16)]
            if (m in (0xE0, 0xEE) and payload.startswith((b"JFIF", b"Adobe")) and length - 2 < 7) or \
                    (m == 0xE2 and payload.startswith(b"MPF\0")) or \
                    (m == 0xE2 and payload.startswith(b"ICC_PROFILE\0") and length - 2 < 14) or \
                    (m == 0xED and payload.startswith(b"Photoshop 3.0\0")):
                return None
        pos = end
    return None


def prepare_image_bytes(data: bytes, max_side: int | None = None, full_decode: bool = False,
                        keep_gray_jpeg: bool = False, max_pixels: int = MAX_PIXELS) -> Prepared:
    """Validate one image file's bytes and return what to store.

    - A baseline/progressive RGB JPEG that ends with its end-of-image marker is stored as the
      original bytes, only its header parsed (no decode): this keeps the shard job near `tar` speed.
      A JPEG without that marker is fully decoded: trailing junk after EOI is fine (kept as is), a
      truncated or corrupt stream is skipped. `full_decode` decodes every file. Every JPEG that is
      decoded is decoded strictly: one whose entropy-coded data libjpeg finds corrupt is skipped
      (`verify_jpeg_data`), never re-encoded into a clean-looking file.
    - Only the formats in IMAGE_FORMATS are opened; a file in another format is skipped, named.
    - Decodable files in another format or colour mode (PNG named .JPEG, CMYK, grayscale, palette)
      are re-encoded as RGB JPEG (quality 95) and reported as repaired.
    - With `max_side`, images larger than that are resized (bicubic) and re-encoded; they are reduced
      before any change of colour mode (JPEGs by the decoder itself), so memory follows the image's
      own decoded size, not a multiple of it.
    - `keep_gray_jpeg` treats a grayscale JPEG as an RGB one (kept as is: DALI decodes it to RGB): the
      served model's choice (`pipeline.serving`), where such a JPEG may be a shard's own image (the
      Fashion-MNIST shards hold grayscale JPEGs) and must give exactly the pixels evaluation scored.
    """
    if not data:
        raise SkipSample("empty file (0 bytes)")
    # (the last bytes only: a longer run of padding after the end-of-image marker goes the decoding way)
    tail_ok = data[:2] == b"\xff\xd8" and data[-256:].rstrip(b"\x00\r\n ")[-2:] == b"\xff\xd9"
    if tail_ok and not full_decode:
        size = plain_jpeg_size(data, (1, 3) if keep_gray_jpeg else (3,))
        # (within PIL's own cap too, above which opening the file with PIL refuses it)
        cap = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))
        if size and size[0] * size[1] <= cap and not (max_side and max(size) > max_side):
            return Prepared(data, *size)
    img = open_image(data)
    fmt, mode = img.format, img.mode
    width, height = img.size
    downscaled = _check_pixels(img, max_side, max_pixels)
    orientation = _orientation(img)
    is_jpeg = fmt in _JPEG_FORMATS
    is_rgb_jpeg = fmt == "JPEG" and (mode == "RGB" or (keep_gray_jpeg and mode == "L"))
    needs_resize = bool(max_side) and max(width, height) > max_side
    as_is = is_rgb_jpeg and not needs_resize and orientation is None
    if as_is and tail_ok and not full_decode:
        return Prepared(data, width, height)
    if is_jpeg:  # every JPEG that is decoded is decoded strictly: no corrupt data re-encoded as a clean file
        verify_jpeg_data(data)
        if as_is:  # (only trailing bytes after EOI, or full_decode asked)
            return Prepared(data, width, height)
    frames = _is_animated(img)
    img = _decode(img, max_side if needs_resize else None)
    repaired = downscaled
    if not is_rgb_jpeg:
        repaired = f"{fmt} {mode} re-encoded as RGB JPEG" + (f"; {repaired}" if repaired else "")
    if frames:
        repaired = (f"{repaired}; " if repaired else "") + "the first of several frames (pages) kept"
    if orientation is not None:
        repaired = f"EXIF orientation {orientation} applied, re-encoded" + (f"; {repaired}" if repaired else "")
    if needs_resize and img.mode not in _RESAMPLED_MODES:
        img = _sixteen_bit_to_l(img) if img.mode in _SIXTEEN_BIT else _to_rgb(img)
    img = _to_rgb(_fit_max_side(img, max_side))
    if mode in _SIXTEEN_BIT:
        repaired = (repaired or "") + "; 16-bit samples scaled to 8 bits"
    if orientation is not None:
        # One orientation for every reader: DALI's decoder applies EXIF orientation, PIL and torchvision
        # do not. The stored image is the displayed one (no orientation tag left), and its recorded
        # size is the displayed size, which the evaluation's crop windows are computed from.
        img = img.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else img
    return Prepared(_encode_jpeg(img, REPAIR_JPEG_QUALITY), img.width, img.height, repaired)


def open_image(data: bytes) -> Image.Image:
    """The image in `data`, opened (header only) by the plugin of one of IMAGE_FORMATS and no other;
    SkipSample naming the format when it is another one."""
    try:
        return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Exception as e:  # PIL raises several types for non-images
        other = _other_format(data)
        if other:
            raise SkipSample(f"{other} images are not accepted (accepted formats: {', '.join(IMAGE_FORMATS)})") \
                from None
        raise SkipSample(f"not a decodable image: {error_reason(e)}") from None


def _other_format(data: bytes) -> str | None:
    """The Pillow format whose signature `data` starts with when it is not an accepted one (a damaged
    file of an accepted format gives None): only the first 16 bytes are compared (each plugin's
    `_accept` check), no plugin opens the file."""
    Image.init()
    prefix, other = data[:16], None
    for fid, (_, accept) in Image.OPEN.items():
        try:
            if accept is None or not accept(prefix):
                continue
        except Exception:  # (a check that needs more bytes than a tiny file has)
            continue
        if fid in IMAGE_FORMATS or fid in _JPEG_FORMATS:
            return None
        other = other or fid
    return other


def _check_pixels(img: Image.Image, max_side: int | None, max_pixels: int) -> str | None:
    """Refuse an image over `max_pixels` unless a JPEG decoder can downscale it while decoding, in
    memory of the downscaled size: a baseline JPEG with a `max_side` below its size. A progressive
    JPEG's decoder holds every DCT coefficient of the whole image whatever the output size (2 bytes a
    coefficient: a 144 MP 4:2:0 file takes ~430 MiB), so it is refused as any other format is.
    Returns the note for an image that will be downscaled while decoding."""
    width, height = img.size
    if width * height <= max_pixels:
        return None
    mp = f"{width}x{height} pixels ({width * height / 1e6:,.0f} MP) exceeds the {max_pixels / 1e6:,.0f} MP cap"
    if not max_side or max(width, height) <= max_side:
        raise SkipSample(f"{mp}; pass a --max-side below {max(width, height)} to store it downscaled")
    if img.format not in _JPEG_FORMATS:
        raise SkipSample(f"{mp}; only JPEGs are downscaled while decoding ({img.format} would be decoded at full size)")
    if img.info.get("progressive"):
        raise SkipSample(f"{mp}; only baseline JPEGs are downscaled while decoding (this progressive JPEG's "
                         f"decoder would hold ~{_coefficient_bytes(img) / 2**20:,.0f} MiB of coefficients)")
    return f"{mp}: downscaled while decoding"


def _coefficient_bytes(img: Image.Image) -> int:
    """Memory libjpeg takes for the DCT coefficients of a whole JPEG (multi-scan files keep them all):
    64 coefficients of 2 bytes per 8x8 block of each component, at its sampling factors."""
    layers = getattr(img, "layer", None) or [(0, 1, 1, 0)] * len(img.getbands())
    hmax, vmax = max(h for _, h, _, _ in layers), max(v for _, _, v, _ in layers)
    blocks = sum(-(-img.width * h // (8 * hmax)) * -(-img.height * v // (8 * vmax)) for _, h, v, _ in layers)
    return blocks * 128


def _is_animated(img: Image.Image) -> bool:
    """Whether a GIF, WebP or TIFF holds more than one frame or page (found before decoding: the reader
    steps over the first frame's data to the second one's header, then back)."""
    try:
        return bool(getattr(img, "is_animated", False))
    except Exception:  # (a damaged second frame: the first one is what is stored)
        return False


def _orientation(img: Image.Image) -> int | None:
    """The EXIF orientation to apply (2-8, or another value that asks for a turn), None when upright."""
    try:
        orientation = int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a damaged EXIF block: the image itself may still be fine
        return None
    return None if orientation in (0, 1) else orientation


def verify_jpeg_data(data: bytes) -> None:
    """Decode every entropy-coded segment of a JPEG, strictly: SkipSample when libjpeg finds the data
    corrupt. libjpeg only warns on corrupt data ("Corrupt JPEG data: bad Huffman code", "... extraneous
    bytes before marker", "premature end of data segment") and goes on with grey or shifted blocks;
    PIL, torchvision and DALI all hand back such an image without an error. simplejpeg's strict mode
    turns those warnings into errors. The decode is at 1/8 scale (DCT scaling: every coefficient is
    still read, the output is 1/64 of the pixels): a baseline JPEG costs the memory of a thumbnail, a
    progressive one also that of its coefficients (2 bytes a sample, within the pixel cap)."""
    try:
        import simplejpeg
    except ImportError:
        raise RuntimeError("checking JPEG data needs the simplejpeg package, one of this project's "
                           "dependencies: pip install -e . (or pip install simplejpeg)") from None
    try:
        _, _, space, _ = simplejpeg.decode_jpeg_header(data)
        simplejpeg.decode_jpeg(data, colorspace=_SIMPLEJPEG_SPACE.get(space, "RGB"), strict=True,
                               min_width=1, min_height=1)
    except Exception as e:  # (ValueError for what libjpeg refuses or warns about)
        raise SkipSample(f"truncated or corrupt JPEG: {error_reason(e)}") from None


def _decode(img: Image.Image, max_side: int | None) -> Image.Image:
    """Decode the image's pixels; a JPEG larger than `max_side` at the smallest DCT scale (1/2, 1/4,
    1/8) that still covers it, so only the reduced image is ever held."""
    if max_side and img.format in _JPEG_FORMATS:
        scale = max_side / max(img.size)
        img.draft(img.mode, (max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    try:
        img.load()
    except Exception as e:
        what = "truncated or corrupt JPEG" if img.format in _JPEG_FORMATS else f"corrupt {img.format}"
        raise SkipSample(f"{what}: {error_reason(e)}") from None
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB image of any mode: alpha composited on white (not dropped onto black), 16-bit
    samples scaled to 8 bits (x/257, what DALI's decoder gives; convert("RGB") would clip them at 255,
    an almost white image), in bands, so no full-size copy wider than 8 bits a sample is ever made."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:
        return _sixteen_bit_to_l(img).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """16-bit samples (PNG I;16, TIFF) as 8-bit ones, x/257 rounded, converted a band of rows at a time."""
    width, height = img.size
    out = np.empty((height, width), np.uint8)
    rows = max(1, (1 << 20) // max(1, width))  # ~1M samples a band (~8 MiB while it is converted)
    for y in range(0, height, rows):
        band = np.asarray(img.crop((0, y, width, min(height, y + rows))), dtype=np.int32)
        np.clip(band, 0, 65535, out=band)
        band += 128
        band //= 257  # (x + 128) // 257 = round(x / 257) on integers
        out[y:y + rows] = band
    return Image.fromarray(out, "L")


class ImageNetSource:
    """ILSVRC2012 on disk.

    Accepted layouts (root is the folder holding `train/` and/or `val/`):
    - `train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG` (folder per class, e.g. after the usual valprep);
    - a flat `val/*.JPEG` labelled by Kaggle's `LOC_val_solution.csv`
      (`ImageId,PredictionString`, label = first wnid of the prediction string).
    Class order is the sorted wnids of `train/` (or of `val/` folders, or of the synset mapping when
    there is no train split), so labels agree between splits. Class names come from
    `LOC_synset_mapping.txt` when present (root or up to three folders above, as in Kaggle's tree).
    """

    name = "imagenet"

    def __init__(self, root: str | os.PathLike, val_labels: str | None = None, max_file_bytes: int = MAX_FILE_BYTES,
                 max_pixels: int = MAX_PIXELS):
        self.max_file_bytes, self.max_pixels = max_file_bytes, max_pixels
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"--root {self.root} is not a directory")
        self._real_root = os.path.realpath(self.root)
        self._real_dirs: dict[str, tuple[str, bool]] = {}  # folder -> its real path, inside the root (prepare)
        self.val_labels = Path(val_labels) if val_labels else self._find_up("LOC_val_solution.csv")
        self.synset_mapping = self._find_up("LOC_synset_mapping.txt")
        self._classes: list[str] | None = None

    def _find_up(self, name: str) -> Path | None:
        for d in [self.root, *list(self.root.resolve().parents)[:3]]:
            if (d / name).is_file():
                return d / name
        return None

    def _mapping(self) -> dict[str, str]:
        if not self.synset_mapping:
            return {}
        out = {}
        for line in self.synset_mapping.read_text().splitlines():
            wnid, _, name = line.strip().partition(" ")
            if wnid:
                out[wnid] = name.strip()
        return out

    def _all_dirs(self, split_dir: Path) -> list[str]:
        if not split_dir.is_dir():
            return []
        return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))

    def _class_dirs(self, split_dir: Path) -> list[str]:
        """Class folders: WordNet ids (n########) or names LOC_synset_mapping.txt lists. Anything else
        (lost+found, a backup folder) would become a class and shift every label: it is ignored, and
        list_split warns about it."""
        known = self._mapping()
        return [d for d in self._all_dirs(split_dir) if _WNID.fullmatch(d) or d in known]

    def classes(self) -> list[str]:
        if self._classes is None:
            classes = self._class_dirs(self.root / "train") or self._class_dirs(self.root / "val")
            if not classes:
                classes = sorted(self._mapping())
            if not classes and self.val_labels:
                classes = sorted(set(self._read_val_csv().values()))
            if not classes:
                stray = sorted(set(self._all_dirs(self.root / "train")) | set(self._all_dirs(self.root / "val")))
                raise SourceError(
                    f"no classes found under {self.root}: expected train/<wnid>/ or val/<wnid>/ folders, "
                    "or LOC_synset_mapping.txt / LOC_val_solution.csv beside a flat val/"
                    + (f" (ignored folders, not WordNet ids n########: {', '.join(stray[:5])})" if stray else "")
                )
            self._classes = classes
        return self._classes

    def _read_val_csv(self) -> dict[str, str]:
        labels = {}
        with open(self.val_labels, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header or header[0] != "ImageId":
                raise SourceError(f"{self.val_labels}: expected a header 'ImageId,PredictionString'")
            for row in reader:
                if len(row) >= 2 and row[1].split():
                    labels[row[0]] = row[1].split()[0]
        return labels

    @staticmethod
    def _files(d: Path) -> list[os.DirEntry]:
        # Anything that is not a folder is an input, broken links included: it is then reported as
        # unreadable instead of vanishing from the count.
        return sorted((e for e in os.scandir(d) if not e.name.startswith(".") and not e.is_dir()),
                      key=lambda e: e.name)

    def list_split(self, split: str) -> Listing:
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise SourceError(f"split '{split}': {split_dir} does not exist")
        classes = self.classes()
        index = {w: i for i, w in enumerate(classes)}
        mapping = self._mapping()
        listing = Listing(classes=classes, items=[],
                          class_names=[mapping.get(w, w) for w in classes] if mapping else None)
        class_dirs = self._class_dirs(split_dir)
        for d in sorted(set(self._all_dirs(split_dir)) - set(class_dirs)):
            listing.warnings.append(f"{split}/{d}: ignored folder (not a WordNet id n######## nor in "
                                    "LOC_synset_mapping.txt)")
        if class_dirs:
            for wnid in class_dirs:
                files = self._files(split_dir / wnid)
                if wnid not in index:
                    listing.skipped += [{"source": f"{split}/{wnid}/{e.name}",
                                         "reason": f"class folder {wnid} is not among the {len(classes)} classes"}
                                        for e in files]
                    continue
                if not files:
                    listing.warnings.append(f"{split}/{wnid}: empty class folder (class kept, 0 images)")
                for e in files:
                    listing.items.append(Item(safe_key(Path(e.name).stem), index[wnid],
                                              f"{split}/{wnid}/{e.name}", {"wnid": wnid}))
            for wnid in sorted(set(classes) - set(class_dirs)):
                listing.warnings.append(f"{split}/{wnid}: class folder missing (0 images)")
        else:
            files = self._files(split_dir)
            if files and not self.val_labels:
                raise SourceError(
                    f"{split_dir} is flat (no class folders) and no LOC_val_solution.csv was found "
                    "in the root or the three folders above it; pass --val-labels FILE"
                )
            labels = self._read_val_csv() if files else {}
            for e in files:
                stem = Path(e.name).stem
                src = f"{split}/{e.name}"
                wnid = labels.get(stem)
                if wnid is None:
                    listing.skipped.append({"source": src, "reason": f"no label in {self.val_labels.name}"})
                elif wnid not in index:
                    listing.skipped.append({"source": src, "reason": f"unknown class {wnid} in {self.val_labels.name}"})
                else:
                    listing.items.append(Item(safe_key(stem), index[wnid], src, {"wnid": wnid}))
        _dedupe_keys(listing)
        return listing

    def prepare(self, item: Item, max_side: int | None = None, full_decode: bool = False) -> Prepared:
        path = os.path.join(self.root, item.source)
        # a symbolic link (to the file or to a folder above it) must lead to a file inside the root: the
        # dataset is what the root holds, not whatever a link in it points at. (The folder's real path is
        # resolved once per folder; a file that is itself a link, in full.)
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                real = os.path.realpath(path)
                inside = os.path.commonpath([real, self._real_root]) == self._real_root
            else:
                folder, name = os.path.split(path)
                known = self._real_dirs.get(folder)
                if known is None:
                    real_folder = os.path.realpath(folder)
                    known = self._real_dirs[folder] = (
                        real_folder, os.path.commonpath([real_folder, self._real_root]) == self._real_root)
                real, inside = os.path.join(known[0], name), known[1]
        except OSError as e:
            raise SkipSample(f"unreadable: {type(e).__name__}: {e.strerror or e}") from None
        if not inside:
            raise SkipSample("symbolic link leads outside the dataset root")
        try:
            if stat.S_ISLNK(st.st_mode):
                st = os.stat(real)
            if not stat.S_ISREG(st.st_mode):  # reading a FIFO would block forever, a device would never end
                kind = next((k for k, f in _SPECIAL.items() if f(st.st_mode)), "special file")
                raise SkipSample(f"not a regular file ({kind})")
            cap = self.max_file_bytes
            if st.st_size > cap:
                raise SkipSample(f"file too large: {st.st_size:,} bytes, the cap is {cap:,} (--max-file-mb)")
            chunks, got = [], 0
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with open(fd, "rb", buffering=0) as f:
                now = os.fstat(fd)
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):  # (replaced since it was checked)
                    raise SkipSample("the file changed while it was read (replaced or moved)")
                while got <= cap:  # (the file may have grown since stat: read to its end, at most cap + 1)
                    b = f.read(min(cap + 1 - got, max(st.st_size + 1 - got, 1 << 20)))
                    if not b:
                        break
                    chunks.append(b)
                    got += len(b)
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if len(data) > cap:
                raise SkipSample(f"file too large: over {cap:,} bytes (--max-file-mb)")
        except OSError as e:
            raise SkipSample(f"unreadable: {type(e).__name__}: {e.strerror or e}") from None
        return prepare_image_bytes(data, max_side=max_side, full_decode=full_decode, max_pixels=self.max_pixels)

    def describe(self) -> dict:
        return {"kind": self.name, "root": str(self.root.resolve())}


def _dedupe_keys(listing: Listing) -> None:
    """Unique keys by construction: a repeated key gets the first `_dup<n>` that no input uses as its own
    key and no earlier repeat was given (`x`, `x`, `x_dup1` -> `x`, `x_dup2`, `x_dup1`)."""
    taken = {it.key for it in listing.items}
    used: set[str] = set()
    for i, it in enumerate(listing.items):
        if it.key not in used:
            used.add(it.key)
            continue
        n = 1
        while f"{it.key}_dup{n}" in taken or f"{it.key}_dup{n}" in used:
            n += 1
        new = f"{it.key}_dup{n}"
        used.add(new)
        listing.warnings.append(f"{it.source}: key {it.key} already used, stored as {new}")
        listing.items[i] = Item(new, it.label, it.source, it.meta)


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file as used by MNIST/Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise SourceError(f"{path}: cannot read IDX file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise SourceError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise SourceError(f"{path}: header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


class FashionMNISTSource:
    """Fashion-MNIST (Xiao et al., 2017) from its four IDX `.gz` files (Debian's dataset-fashion-mnist).

    Images are stored as 1-channel (grayscale) 28x28 JPEG, quality 100; DALI and PIL decode them to
    RGB on read. `train` is the 60,000-image training set, `val` the 10,000-image t10k test set.
    """

    name = "fashion-mnist"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"--root {self.root} is not a directory")
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in FASHION_MNIST_FILES:
            raise SourceError(f"Fashion-MNIST has splits {sorted(FASHION_MNIST_FILES)}, not '{split}'")
        if split not in self._arrays:
            img_name, lbl_name = FASHION_MNIST_FILES[split]
            paths = [self.root / img_name, self.root / lbl_name]
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                raise SourceError(f"Fashion-MNIST files missing: {', '.join(missing)}")
            images, labels = read_idx(paths[0]), read_idx(paths[1])
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise SourceError(f"{paths[0]} / {paths[1]}: shapes {images.shape} and {labels.shape} do not match")
            self._arrays[split] = (images, labels)
        return self._arrays[split]

    def list_split(self, split: str) -> Listing:
        images, labels = self._load(split)
        img_name = FASHION_MNIST_FILES[split][0]
        items = []
        for i, lab in enumerate(labels.tolist()):
            items.append(Item(f"{split}_{i:06d}", int(lab), f"{img_name}#{i}",
                              {"class_name": FASHION_MNIST_CLASSES[lab], "index": i}))
        return Listing(classes=list(FASHION_MNIST_CLASSES), items=items, class_names=list(FASHION_MNIST_CLASSES))

    def prepare(self, item: Item, max_side: int | None = None, full_decode: bool = False) -> Prepared:
        split = "train" if item.source.startswith(FASHION_MNIST_FILES["train"][0]) else "val"
        images, _ = self._load(split)
        img = _fit_max_side(Image.fromarray(np.ascontiguousarray(images[item.meta["index"]])), max_side)
        return Prepared(_encode_jpeg(img, FASHION_MNIST_JPEG_QUALITY), img.width, img.height)

    def describe(self) -> dict:
        return {"kind": self.name, "root": str(self.root.resolve())}


class FashionMNISTScenesSource(FashionMNISTSource):
    """Fashion-MNIST garments placed in larger RGB scenes at many scales, aspects and positions
    (`pipeline.shards.scenes`): the same IDX files, items and labels as FashionMNISTSource; each image is
    stored as a `canvas` x `canvas` RGB JPEG drawn from (scene seed, split, index) alone."""

    name = "fashion-mnist-scenes"

    def __init__(self, root: str | os.PathLike, settings=None):
        super().__init__(root)
        try:
            self.settings = (settings or SceneSettings()).validate()
        except ValueError as e:
            raise SourceError(str(e)) from None

    def prepare(self, item: Item, max_side: int | None = None, full_decode: bool = False) -> Prepared:
        split = "train" if item.source.startswith(FASHION_MNIST_FILES["train"][0]) else "val"
        images, _ = self._load(split)
        index = item.meta["index"]
        params = scene_params(self.settings.seed, split, index, self.settings)
        img = _fit_max_side(render_scene(images[index], params, self.settings), max_side)
        return Prepared(_encode_jpeg(img, self.settings.quality), img.width, img.height)

    def describe(self) -> dict:
        return {**super().describe(), **self.settings.describe()}


SOURCES = {"imagenet": ImageNetSource, "fashion-mnist": FashionMNISTSource,
           "fashion-mnist-scenes": FashionMNISTScenesSource}


def open_source(kind: str, root: str, val_labels: str | None = None, max_file_mb: int | None = None,
                max_megapixels: int | None = None, scenes=None):
    """The source of a shard job; the caps (default MAX_FILE_BYTES, MAX_PIXELS) apply to files read from disk;
    `scenes` (a `pipeline.shards.scenes.SceneSettings`, default its defaults) is fashion-mnist-scenes' drawing."""
    if kind not in SOURCES:
        raise SourceError(f"unknown source '{kind}'; choose one of {sorted(SOURCES)}")
    if not Path(root).exists():
        raise SourceError(f"--root {root} does not exist")
    if kind == "imagenet":
        return ImageNetSource(root, val_labels=val_labels,
                              max_file_bytes=max_file_mb * 2**20 if max_file_mb else MAX_FILE_BYTES,
                              max_pixels=max_megapixels * 1_000_000 if max_megapixels else MAX_PIXELS)
    if kind == "fashion-mnist-scenes":
        return FashionMNISTScenesSource(root, scenes)
    return FashionMNISTSource(root)
