"""What image preparation (the shard job's and the served model's) does with inputs a user may send: the
memory one image takes, measured in a child process; the formats it opens, and those it refuses by
name; a JPEG whose entropy-coded data is corrupt behind a valid header and end marker."""

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from pipeline.shards.sources import IMAGE_FORMATS, ImageNetSource, SkipSample, prepare_image_bytes

# Runs one preparation in a fresh process: warms up (imports, plugins, a small image of each kind),
# resets the process's peak resident memory (/proc/self/clear_refs), prepares the file and prints how far
# the peak rose above the resident memory before it, and the outcome.
PEAK_SCRIPT = textwrap.dedent("""
    import io, json, sys
    import numpy as np
    from PIL import Image
    from pipeline.shards.sources import SkipSample, prepare_image_bytes

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    data, kw = open(sys.argv[1], "rb").read(), json.loads(sys.argv[2])
    for arr in (np.zeros((40, 40), np.uint16), np.zeros((40, 40, 3), np.uint8)):
        for kind in ("PNG", "JPEG"):
            if kind == "PNG" or arr.dtype == np.uint8:
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format=kind)
                prepare_image_bytes(buf.getvalue(), max_side=16)
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS")
    try:
        p = prepare_image_bytes(data, **kw)
        outcome = {"size": [p.width, p.height], "repaired": p.repaired}
    except SkipSample as e:
        outcome = {"skipped": str(e)}
    print(json.dumps({"peak": status("VmHWM") - before, **outcome}))
""")


def peak_of(tmp_path, data: bytes, **kw) -> dict:
    path = tmp_path / "input"
    path.write_bytes(data)
    p = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), json.dumps(kw)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(width=256, height=192, seed=0) -> np.ndarray:
    """Smooth photo-like content (waves and mild noise): JPEG codes it as a camera picture, not as noise."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([np.sin(x / 17 + c) * 60 + np.cos(y / 23 + 2 * c) * 60 + 128 for c in range(3)], -1)
    arr += np.random.default_rng(seed).normal(0, 8, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def test_a_16_bit_png_is_reduced_without_full_size_float_copies(tmp_path):
    """A 16-bit PNG with --max-side: the peak stays within 4x its own decoded size (2 bytes a pixel;
    ~2.2x measured), where scaling the whole image to 8 bits through float64 arrays took ~20 bytes a
    pixel (~9.5x)."""
    width = height = 3000
    ramp = (np.linspace(0, 65535, width)[None, :].repeat(height, 0) * 0.95).astype(np.uint16)
    data = encoded(Image.fromarray(ramp), "PNG", compress_level=1)
    out = peak_of(tmp_path, data, max_side=256)
    assert out["size"] == [256, 256] and "16-bit samples scaled to 8 bits" in out["repaired"], out
    decoded = 2 * width * height
    assert out["peak"] < 4 * decoded, f"peak {out['peak'] / 2**20:.0f} MiB for a {decoded / 2**20:.0f} MiB image"


def test_a_jpeg_over_the_pixel_cap_is_downscaled_in_bounded_memory_or_refused(tmp_path):
    """Over the pixel cap with --max-side: a baseline JPEG is downscaled by the decoder in memory of the
    reduced image; a progressive one is refused, named (its decoder keeps every coefficient of the full
    image, ~36 MiB here, ~430 MiB for a 144 MP photo) instead of being decoded at that cost."""
    rgb = Image.fromarray(photo(4000, 3000))
    cap = dict(max_side=500, max_pixels=2_000_000)  # 12 MP under a 2 MP cap stands in for 144 MP under 50
    at_cap = 4 * cap["max_pixels"]  # what decoding an RGB image at the cap takes (PIL: 4 bytes a pixel)
    baseline = peak_of(tmp_path, encoded(rgb, "JPEG", quality=90), **cap)
    assert baseline["size"] == [500, 375] and "downscaled while decoding" in baseline["repaired"], baseline
    progressive = peak_of(tmp_path, encoded(rgb, "JPEG", quality=90, progressive=True), **cap)
    assert "only baseline JPEGs are downscaled while decoding" in progressive.get("skipped", ""), progressive
    assert "progressive" in progressive["skipped"], progressive
    for name, out in (("baseline", baseline), ("progressive", progressive)):
        assert out["peak"] < at_cap, f"{name}: peak {out['peak'] / 2**20:.0f} MiB"


def other_formats() -> dict[str, bytes]:
    """Files in formats Pillow opens but preparation does not; EPS's plugin would run Ghostscript."""
    img = Image.fromarray(photo(32, 24))
    eps = encoded(img, "EPS")
    assert eps.startswith(b"%!PS-Adobe")
    return {"EPS": eps, "ICO": encoded(img, "ICO"), "PPM": encoded(img, "PPM"), "JPEG2000": encoded(img, "JPEG2000"),
            "QOI": encoded(img, "QOI"), "DDS": encoded(img, "DDS")}


def accepted_formats() -> dict[str, bytes]:
    img = Image.fromarray(photo(32, 24))
    return {"JPEG": encoded(img, "JPEG", quality=90), "PNG": encoded(img, "PNG"), "WEBP": encoded(img, "WEBP"),
            "BMP": encoded(img, "BMP"), "TIFF": encoded(img, "TIFF"), "GIF": encoded(img, "GIF")}


@pytest.mark.parametrize("fmt", list(other_formats()))
def test_formats_outside_the_list_are_refused_by_name(fmt):
    data = other_formats()[fmt]
    assert Image.open(io.BytesIO(data)).format == fmt  # (Pillow itself would open it)
    with pytest.raises(SkipSample, match=rf"^{fmt} images are not accepted \(accepted formats: JPEG, PNG"):
        prepare_image_bytes(data)


def test_every_listed_format_is_prepared():
    kinds = accepted_formats()
    assert sorted(kinds) == sorted(IMAGE_FORMATS)
    for fmt, data in kinds.items():
        p = prepare_image_bytes(data)
        assert (p.width, p.height) == (32, 24), fmt
        assert Image.open(io.BytesIO(p.jpg)).format == "JPEG", fmt


def test_an_animated_gif_gives_its_first_frame_and_says_so():
    frames = [Image.new("RGB", (30, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    p = prepare_image_bytes(encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    assert p.repaired == "GIF P re-encoded as RGB JPEG; the first of several frames (pages) kept", p.repaired
    r, g, b = Image.open(io.BytesIO(p.jpg)).convert("RGB").getpixel((15, 10))
    assert r > 240 and g < 15 and b < 15
    assert "frames" not in prepare_image_bytes(encoded(frames[0], "GIF")).repaired


def test_a_damaged_file_of_a_listed_format_is_not_named_as_another():
    """A file with the signature of a listed format that does not open is damaged, not another format."""
    for data in (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00garbage", b"\x89PNG\r\n\x1a\n\x00\x00junk", b"GIF89a\x00"):
        with pytest.raises(SkipSample, match="^not a decodable image"):
            prepare_image_bytes(data)


def test_the_shard_job_reports_a_refused_format_as_a_skip(tmp_path):
    d = tmp_path / "train" / "n01440764"
    d.mkdir(parents=True)
    (d / "drawing.JPEG").write_bytes(other_formats()["EPS"])
    src = ImageNetSource(tmp_path)
    [item] = src.list_split("train").items
    with pytest.raises(SkipSample, match="EPS images are not accepted"):
        src.prepare(item)


def entropy_corrupted(data: bytes) -> bytes:
    """`data` with bytes flipped in its entropy-coded segment; markers, headers and the end marker kept."""
    sos = data.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    b = bytearray(data)
    for at in range(start + (len(data) - start) // 3, len(data) - 16, 97)[:8]:
        if b[at] not in (0x00, 0xFF) and b[at - 1] != 0xFF:
            b[at] ^= 0x5A if b[at] ^ 0x5A != 0xFF else 0x3C
    assert b[:start] == data[:start] and b[-2:] == b"\xff\xd9" and b != bytearray(data)
    return bytes(b)


def corrupt_jpeg(**kw) -> bytes:
    return entropy_corrupted(encoded(Image.fromarray(photo()), "JPEG", quality=90, **kw))


@pytest.mark.parametrize("kw", [{}, {"progressive": True}], ids=["baseline", "progressive"])
def test_corrupt_entropy_coded_data_is_caught_when_decoding(kw):
    """PIL decodes such a file without an error (libjpeg only warns, and fills in grey blocks); a full
    decode refuses it, and the shard job never re-encodes one into a clean-looking file."""
    bad = corrupt_jpeg(**kw)
    img = Image.open(io.BytesIO(bad))
    img.load()  # no error: what every reader would have served
    assert prepare_image_bytes(bad).jpg == bad  # the header-only path does not decode it
    with pytest.raises(SkipSample, match="truncated or corrupt JPEG: .*Corrupt JPEG data"):
        prepare_image_bytes(bad, full_decode=True)
    with pytest.raises(SkipSample, match="Corrupt JPEG data"):
        prepare_image_bytes(bad, max_side=100)  # decoded to be resized
    good = encoded(Image.fromarray(photo()), "JPEG", quality=90, **kw)
    assert prepare_image_bytes(good, full_decode=True).jpg == good
