"""Raw readers and per-file validation/repair (no Ray needed)."""

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    WNIDS,
    declared_size_jpeg,
    jpeg_bytes,
    make_fashion_mnist,
    png16_bytes,
    png_bytes,
    write_idx,
)
from PIL import Image

from pipeline.shards import sources
from pipeline.shards.sources import (
    FASHION_MNIST_CLASSES,
    FashionMNISTSource,
    ImageNetSource,
    SkipSample,
    SourceError,
    open_source,
    prepare_image_bytes,
    safe_key,
)


def decode(b: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(b))
    img.load()
    return img


def test_valid_rgb_jpeg_is_stored_byte_for_byte():
    data = jpeg_bytes(size=(70, 50))
    p = prepare_image_bytes(data)
    assert p.jpg is data or p.jpg == data
    assert (p.width, p.height, p.repaired) == (70, 50, None)


def test_trailing_bytes_after_eoi_are_kept_not_skipped():
    data = jpeg_bytes() + b"GARBAGE-AFTER-EOI" * 10
    p = prepare_image_bytes(data)
    assert p.jpg == data and p.repaired is None


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"<html>not an image</html>", "not a decodable image"),
    (jpeg_bytes(size=(120, 90))[:2000], "truncated or corrupt JPEG"),
])
def test_undecodable_inputs_are_skipped_with_a_reason(data, reason):
    with pytest.raises(SkipSample, match=reason):
        prepare_image_bytes(data)


@pytest.mark.parametrize("data,what", [
    (png_bytes(size=(40, 30)), "PNG RGB"),
    (jpeg_bytes(mode="CMYK", size=(40, 30)), "JPEG CMYK"),
    (jpeg_bytes(mode="L", size=(40, 30)), "JPEG L"),
])
def test_decodable_odd_files_are_repaired_to_rgb_jpeg(data, what):
    p = prepare_image_bytes(data)
    assert p.repaired and p.repaired.startswith(what)
    img = decode(p.jpg)
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (40, 30))


def test_max_side_resizes_only_larger_images():
    big = prepare_image_bytes(jpeg_bytes(size=(200, 100)), max_side=64)
    assert (big.width, big.height) == (64, 32) and decode(big.jpg).size == (64, 32)
    small = jpeg_bytes(size=(50, 40))
    assert prepare_image_bytes(small, max_side=64).jpg == small


def test_full_decode_catches_corruption_the_header_check_misses():
    data = bytearray(jpeg_bytes(size=(64, 64), seed=3))
    # Keep SOI/EOI and the headers but cut the entropy-coded middle: only a decode notices.
    cut = bytes(data[:400]) + bytes(data[-2:])
    with pytest.raises(SkipSample):
        prepare_image_bytes(cut, full_decode=True)


def test_keys_have_no_dots():
    assert safe_key("n0144.0764_1 (copy)") == "n0144_0764_1__copy_"


def test_imagenet_listing_classes_labels_and_bad_entries(tiny_imagenet):
    root, planted = tiny_imagenet
    src = ImageNetSource(root)
    assert src.classes() == sorted(WNIDS + ["n09999999"])
    train = src.list_split("train")
    assert any("n09999999" in w and "empty class folder" in w for w in train.warnings)
    n_files = sum(1 for p in (root / "train").rglob("*") if not p.is_dir())
    assert len(train.items) == n_files  # every file is an input, broken link included
    for it in train.items:
        assert src.classes()[it.label] == it.source.split("/")[1] == it.meta["wnid"]
    val = src.list_split("val")
    assert len(val.items) == 6
    reasons = {s["source"]: s["reason"] for s in val.skipped}
    assert "no label" in reasons["val/ILSVRC2012_val_00000099.JPEG"]
    assert "unknown class n00000000" in reasons["val/ILSVRC2012_val_00000098.JPEG"]
    for it in val.items:
        i = int(it.key.rsplit("_", 1)[1]) - 1
        assert it.meta["wnid"] == WNIDS[i % 3]


def test_imagenet_unreadable_file_is_a_skip_not_a_crash(tiny_imagenet):
    root, _ = tiny_imagenet
    src = ImageNetSource(root)
    item = next(it for it in src.list_split("train").items if it.source.endswith("unreadable.JPEG"))
    with pytest.raises(SkipSample, match="unreadable"):
        src.prepare(item)


def test_flat_val_without_labels_file_is_a_clear_error(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "a.JPEG").write_bytes(jpeg_bytes())
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\n")
    with pytest.raises(SourceError, match="LOC_val_solution.csv"):
        ImageNetSource(tmp_path).list_split("val")


def test_class_names_from_synset_mapping(tiny_imagenet):
    root, _ = tiny_imagenet
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} name {w}\n" for w in WNIDS))
    listing = ImageNetSource(root).list_split("train")
    assert listing.class_names[listing.classes.index(WNIDS[1])] == f"name {WNIDS[1]}"


def test_missing_root_and_unknown_split_are_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_source("imagenet", str(tmp_path / "nope"))
    (tmp_path / "train" / "n1").mkdir(parents=True)
    with pytest.raises(SourceError, match="split 'test'"):
        ImageNetSource(tmp_path).list_split("test")


def test_fashion_mnist_reads_idx_and_stores_grayscale_jpeg(tmp_path):
    root = make_fashion_mnist(tmp_path, n_train=12, n_val=5)
    src = FashionMNISTSource(root)
    train = src.list_split("train")
    assert len(train.items) == 12 and train.classes == FASHION_MNIST_CLASSES
    assert [it.label for it in train.items] == [i % 10 for i in range(12)]
    p = src.prepare(train.items[3])
    img = decode(p.jpg)
    assert (img.format, img.mode, img.size) == ("JPEG", "L", (28, 28))
    images = np.frombuffer(__import__("gzip").open(root / "train-images-idx3-ubyte.gz").read()[16:], np.uint8)
    original = images.reshape(-1, 28, 28)[3].astype(int)
    assert np.abs(np.asarray(img).astype(int) - original).mean() < 2.0  # quality 100: near lossless
    assert len(src.list_split("val").items) == 5


def test_fashion_mnist_bad_files_are_clear_errors(tmp_path):
    root = make_fashion_mnist(tmp_path, n_train=4, n_val=2)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SourceError, match="missing"):
        FashionMNISTSource(root).list_split("val")
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(3))  # 3 labels for 2 images
    with pytest.raises(SourceError, match="do not match"):
        FashionMNISTSource(root).list_split("val")
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"junk")
    with pytest.raises(SourceError, match="cannot read IDX"):
        FashionMNISTSource(root).list_split("train")


# ---------------------------------------------------------------- hostile inputs

def _imagenet(root, names: list[str], wnid: str = WNIDS[0]):
    d = root / "train" / wnid
    d.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        (d / n).write_bytes(jpeg_bytes(seed=i))
    return d


def test_keys_are_unique_by_construction(tmp_path):
    _imagenet(tmp_path, ["x.JPEG", "x.png", "x_dup1.JPEG", "x.jpeg"])
    keys = [it.key for it in ImageNetSource(tmp_path).list_split("train").items]
    assert len(keys) == 4 and len(set(keys)) == 4 and "x_dup1" in keys and "x" in keys


def test_long_unicode_names_fit_tar_and_stay_unique(tmp_path):
    from pipeline.data.dali import read_index
    from pipeline.shards.format import ShardSample
    from pipeline.shards.splits import open_split, write_split

    stems = ["é" * 123 + "a", "é" * 123 + "b", "z" * 250]  # file names of 252 and 255 bytes
    _imagenet(tmp_path, [s + ".JPEG" for s in stems])
    src = ImageNetSource(tmp_path)
    items = src.list_split("train").items
    assert all(len(it.key) <= 80 for it in items) and len({it.key for it in items}) == 3
    split = write_split(tmp_path / "out" / "train", (ShardSample(it.key, it.label, src.prepare(it).jpg,
                                                                 {"source": it.source, "width": 64, "height": 48})
                                                     for it in items), WNIDS)
    assert [s.key for s in read_index(open_split(split.dir))] == [it.key for it in items]
    assert len(safe_key("q" * 81)) <= 80 and safe_key("q" * 81) != safe_key("q" * 82)


def test_special_files_are_skipped_not_read(tmp_path):
    import os
    import threading

    d = _imagenet(tmp_path, ["good.JPEG"])
    os.mkfifo(d / "pipe.JPEG")
    os.symlink(d / "pipe.JPEG", d / "link-to-pipe.JPEG")
    src = ImageNetSource(tmp_path)
    items = {it.source.rsplit("/", 1)[1]: it for it in src.list_split("train").items}
    got = {}

    def prepare_all():
        for name, it in items.items():
            try:
                got[name] = src.prepare(it)
            except SkipSample as e:
                got[name] = str(e)

    t = threading.Thread(target=prepare_all, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "reading a FIFO blocked"
    assert got["pipe.JPEG"] == got["link-to-pipe.JPEG"] == "not a regular file (FIFO)"
    assert got["good.JPEG"].width == 64


def test_stray_folders_are_not_classes(tmp_path):
    _imagenet(tmp_path, ["a.JPEG"], WNIDS[0])
    _imagenet(tmp_path, ["b.JPEG"], WNIDS[1])
    (tmp_path / "train" / "lost+found").mkdir()
    (tmp_path / "train" / "backup").mkdir()
    (tmp_path / "train" / "backup" / "c.JPEG").write_bytes(jpeg_bytes())
    src = ImageNetSource(tmp_path)
    assert src.classes() == sorted(WNIDS[:2])
    listing = src.list_split("train")
    assert sorted(it.label for it in listing.items) == [0, 1]
    assert any("lost+found: ignored folder" in w for w in listing.warnings)
    assert any("backup: ignored folder" in w for w in listing.warnings)


def test_split_and_manifest_names_cannot_leave_their_folder(tmp_path):
    import json

    from pipeline.config import ConfigError, ShardConfig
    from pipeline.shards.format import ShardError, ShardSample
    from pipeline.shards.splits import open_split, write_split

    for bad in ("..", ".", ".hidden", "a\\b"):
        with pytest.raises(ConfigError, match="splits"):
            ShardConfig(splits=["train", bad]).validate()
    split = write_split(tmp_path / "val", [ShardSample("k", 0, jpeg_bytes(), {"width": 64, "height": 48})], ["c"])
    m = json.loads((split.dir / "manifest.json").read_text())
    for name in ("../elsewhere.tar", "/etc/passwd", ".hidden.tar"):
        m["shards"][0]["name"] = name
        (split.dir / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ShardError, match="not a plain file name"):
            open_split(split.dir)


def test_exif_orientation_is_applied_at_shard_time_so_every_reader_agrees(tmp_path):
    """A 64x32 JPEG tagged Orientation=6 (displayed rotated, 32 wide and 64 high): stored as the displayed
    image without the tag, its recorded size the displayed size, listed as repaired; DALI's evaluation
    crops and the plain-torch reference (PIL, as the fallback reads) agree on it."""
    import torch

    from pipeline.data.dali_eval import DALIEvalLoader
    from pipeline.evaluate.reference import decode_rgb, torch_crops
    from pipeline.shards.format import ShardSample
    from pipeline.shards.splits import write_split

    arr = np.zeros((32, 64, 3), dtype=np.uint8)
    arr[:, :32] = (250, 20, 20)  # left half red, right half blue in the stored (unrotated) pixels
    arr[:, 32:] = (20, 20, 250)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    p = prepare_image_bytes(buf.getvalue())
    assert (p.width, p.height) == (32, 64) and "EXIF orientation 6 applied" in p.repaired
    stored = decode(p.jpg)
    assert stored.size == (32, 64) and stored.getexif().get(0x0112) in (None, 1)
    top, bottom = np.asarray(stored)[4, 16], np.asarray(stored)[60, 16]
    assert top[0] > 200 and bottom[2] > 200  # rotated 90 degrees clockwise: red on top, blue below
    split = write_split(tmp_path / "val", [ShardSample("r", 0, p.jpg, {"width": p.width, "height": p.height})], ["c"])
    x, _ = next(iter(DALIEvalLoader(split.dir, n_crops=10, input_size=32, batch_size=1, device="cpu")))
    ref = torch_crops(decode_rgb(p.jpg), 10, 32)
    assert (x[0].int() - ref.int()).abs().float().mean() <= 1.0
    assert torch.equal(torch.tensor(x.shape[-2:]), torch.tensor([32, 32]))


def test_shard_files_are_fsynced_before_they_are_renamed_into_place(tmp_path, monkeypatch):
    """Durability order for one shard (write_shard, called directly): the tar, index and part file are
    each fsynced before the rename that names them complete, and the folder after."""
    import os

    from pipeline.shards.storage import local

    _imagenet(tmp_path / "src", ["a.JPEG", "b.JPEG"])
    src = ImageNetSource(tmp_path / "src")
    items = src.list_split("train").items
    out = tmp_path / "out"
    (out / ".parts").mkdir(parents=True)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    local.write_shard(src, str(out), "imagenet", "train", 0, items, None, False, "job-digest")
    renames = [e for e in events if e[0] == "replace"]
    assert {Path(e[2]).name for e in renames} >= {"imagenet-train-000000.tar", "imagenet-train-000000.idx",
                                                  "imagenet-train-000000.json"}
    for e in renames:
        i = events.index(e)
        assert ("fsync", e[1]) in events[:i], f"{e[1]} renamed before it was fsynced"
        assert ("fsync", str(Path(e[2]).parent)) in events[i + 1:], f"{Path(e[2]).parent} not fsynced after"


# ------------------------------------------------------------------ inputs that could exhaust a worker

def one_class_root(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "imagenet"
    d = root / "train" / WNIDS[0]
    d.mkdir(parents=True)
    (d / "ok.JPEG").write_bytes(jpeg_bytes(seed=1))
    return root, d


def prepared(root: Path, name: str | bytes, **kw):
    src = ImageNetSource(root)
    listing = src.list_split("train")
    wanted = name if isinstance(name, str) else name.decode("utf-8", "surrogateescape")
    [item] = [it for it in listing.items if Path(it.source).name == wanted]
    return src.prepare(item, **kw)


def test_links_must_lead_inside_the_root(tmp_path):
    root, d = one_class_root(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.JPEG").write_bytes(jpeg_bytes(seed=2))
    (d / "out.JPEG").symlink_to(outside / "secret.JPEG")
    (d / "in.JPEG").symlink_to(d / "ok.JPEG")
    (root / "train" / WNIDS[1]).symlink_to(outside, target_is_directory=True)  # a class folder linked out
    assert prepared(root, "in.JPEG").jpg == (d / "ok.JPEG").read_bytes()
    with pytest.raises(SkipSample, match="symbolic link leads outside the dataset root"):
        prepared(root, "out.JPEG")
    with pytest.raises(SkipSample, match="outside the dataset root"):
        prepared(root, "secret.JPEG")


def test_files_over_the_size_cap_are_skipped_unread(tmp_path):
    root, d = one_class_root(tmp_path)
    with open(d / "huge.JPEG", "wb") as f:  # sparse: no disk used, and never read
        f.truncate(sources.MAX_FILE_BYTES + 1)
    with pytest.raises(SkipSample, match="file too large"):
        prepared(root, "huge.JPEG")
    # the cap is a setting (--max-file-mb): 1 MiB refuses a 2 MiB file that the default takes
    with open(d / "two-mib.JPEG", "wb") as f:
        f.write(jpeg_bytes(seed=3) + b"\0" * (2 * 2**20))  # trailing bytes after EOI: a valid JPEG
    assert prepared(root, "two-mib.JPEG").width > 0
    src = open_source("imagenet", str(root), max_file_mb=1)
    [item] = [it for it in src.list_split("train").items if it.source.endswith("two-mib.JPEG")]
    with pytest.raises(SkipSample, match=r"file too large: 2,[\d,]+ bytes, the cap is 1,048,576 \(--max-file-mb\)"):
        src.prepare(item)


def test_a_declared_pixel_bomb_is_refused_without_decoding():
    bomb = declared_size_jpeg(12000, 12000)
    assert len(bomb) < 1000 and Image.open(io.BytesIO(bomb)).size == (12000, 12000)
    with pytest.raises(SkipSample, match=r"12000x12000 pixels \(144 MP\) exceeds the 50 MP cap; pass a --max-side"):
        prepare_image_bytes(bomb)
    with pytest.raises(SkipSample, match="exceeds the 50 MP cap"):
        prepare_image_bytes(bomb, max_side=12000)  # would not bring it under the cap


def test_a_jpeg_over_the_pixel_cap_is_downscaled_while_decoding_with_max_side(tmp_path):
    data = jpeg_bytes(size=(1600, 1000), seed=4)  # 1.6 MP under a 1 MP cap stands in for 60 MP under 50
    assert prepare_image_bytes(data).repaired is None  # under the default cap: stored as is
    with pytest.raises(SkipSample, match="exceeds the 1 MP cap"):
        prepare_image_bytes(data, max_pixels=1_000_000)
    p = prepare_image_bytes(data, max_side=400, max_pixels=1_000_000)
    assert (p.width, p.height) == (400, 250) == decode(p.jpg).size
    assert "downscaled while decoding" in p.repaired
    png = io.BytesIO()
    Image.new("RGB", (1600, 1000)).save(png, format="PNG")
    with pytest.raises(SkipSample, match="only JPEGs are downscaled"):
        prepare_image_bytes(png.getvalue(), max_side=400, max_pixels=1_000_000)
    # the shard job's setting (--max-megapixels) reaches the source
    root, d = one_class_root(tmp_path)
    (d / "big.JPEG").write_bytes(data)
    src = open_source("imagenet", str(root), max_megapixels=1)
    [item] = [it for it in src.list_split("train").items if it.source.endswith("big.JPEG")]
    with pytest.raises(SkipSample, match="exceeds the 1 MP cap"):
        src.prepare(item)


def test_16_bit_images_are_scaled_to_8_bits_as_dali_decodes_them():
    from nvidia.dali import fn, pipeline_def, types

    data, arr = png16_bytes()
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    p = prepare_image_bytes(data)
    assert "16-bit samples scaled to 8 bits" in p.repaired
    stored = np.asarray(decode(p.jpg).convert("RGB"), dtype=np.float64)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def dali_decode():
        raw = fn.external_source(source=lambda: [np.frombuffer(data, np.uint8)], batch=True)
        return fn.decoders.image(raw, device="cpu", output_type=types.RGB)

    pipe = dali_decode()
    pipe.build()
    dali = np.asarray(pipe.run()[0][0], dtype=np.float64)
    assert abs(dali.mean() - arr.mean() / 257) < 1  # ~121: what DALI gives for the original file
    assert abs(stored.mean() - dali.mean()) < 1.5  # not 254 (clipped at 255: nearly white)
    assert np.abs(stored - dali).max() < 12  # pixel for pixel, within JPEG's error


def test_a_name_that_is_not_utf8_is_listed_and_read(tmp_path):
    root, d = one_class_root(tmp_path)
    name = b"caf\xe9.JPEG"
    with open(os.path.join(os.fsencode(d), name), "wb") as f:
        f.write(jpeg_bytes(seed=5))
    p = prepared(root, name)
    assert p.jpg == jpeg_bytes(seed=5)


def _header_variants() -> dict[str, bytes]:
    """JPEGs whose headers hold the segments real files carry (JFIF, Adobe, ICC, comments, EXIF, XMP,
    progressive frames, restart intervals, grayscale and CMYK frames)."""
    from PIL import ImageCms

    rgb = np.random.default_rng(5).integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    upright, rotated = Image.Exif(), Image.Exif()
    upright[0x0112], rotated[0x0112] = 1, 8
    xmp = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    kinds = {"baseline": {}, "progressive": {"progressive": True}, "optimized": {"optimize": True},
             "icc": {"icc_profile": icc}, "comment": {"comment": b"a comment"},
             "exif-upright": {"exif": upright.tobytes()}, "exif-rotated": {"exif": rotated.tobytes()},
             "xmp": {"xmp": xmp}, "restarts": {"restart_marker_rows": 1}, "4:4:4": {"subsampling": 0}}
    out = {}
    for name, kw in kinds.items():
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=90, **kw)
        out[name] = buf.getvalue()
    for mode in ("L", "CMYK"):
        buf = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buf, format="JPEG", quality=90)
        out[mode] = buf.getvalue()
    buf = io.BytesIO()  # two frames: PIL opens it as MPO, not JPEG
    Image.fromarray(rgb).save(buf, format="MPO", save_all=True, append_images=[Image.fromarray(rgb[::-1])])
    out["mpo"] = buf.getvalue()

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    photoshop = b"Photoshop 3.0\0" + b"8BIM" + (0x0404).to_bytes(2, "big") + b"\0\0" + (4).to_bytes(4, "big") + b"abcd"
    adobe = b"Adobe" + bytes([0, 100, 0, 0, 0, 0, 1])
    for name, seg in {"adobe": segment(0xEE, adobe), "photoshop": segment(0xED, photoshop),
                      "app15": segment(0xEF, b"anything")}.items():
        out[name] = out["baseline"][:2] + seg + out["baseline"][2:]
    return out


def _segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each marker segment before the first scan's data."""
    out, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        out.append((pos, end))
        if data[pos + 1] == 0xDA:
            break
        pos = end
    return out


def _outcome(data: bytes, **kw):
    try:
        p = prepare_image_bytes(data, **kw)
    except SkipSample as e:
        return ("skip", str(e))
    return (p.jpg == data, p.width, p.height, p.repaired, hashlib.sha256(p.jpg).hexdigest())


@pytest.mark.filterwarnings("ignore")  # (PIL warns about the damaged EXIF blocks some mutations make)
def test_the_header_only_path_decides_as_pil_does(monkeypatch):
    """Most JPEGs are stored as is after a header check that does not open them with PIL
    (`plain_jpeg_size`). On real headers and on thousands of mutations of them (bytes flipped, segments
    cut, lengths changed), every file it accepts gets exactly the outcome PIL gives it (stored bytes,
    size, repairs, skip reasons), and PIL agrees on format, mode, size and no orientation."""
    from pipeline.shards.sources import plain_jpeg_size

    variants = _header_variants()
    accepted = {k for k, v in variants.items() if plain_jpeg_size(v)}
    assert accepted == {"baseline", "progressive", "optimized", "icc", "comment", "restarts", "4:4:4", "adobe",
                        "app15"}
    assert plain_jpeg_size(variants["L"], (1, 3)) == (40, 24)
    rng = np.random.default_rng(0)
    cases = []
    for data in variants.values():
        sos = data.index(b"\xff\xda")
        cases.append(data)
        for start, end in _segments(data):  # one segment shorter or longer, its length field to match
            bodies = [data[start + 4:end + k] for k in (-40, -12, -7, -3, -1) if end + k > start + 4]
            bodies += [data[start + 4:end] + bytes(k) for k in (1, 2, 3, 64)]
            bodies += [data[start + 4:start + 4 + k] for k in (0, 4, 6, 13) if start + 4 + k < end]
            for body in bodies:
                cases.append(data[:start + 2] + (len(body) + 2).to_bytes(2, "big") + body + data[end:])
        for _ in range(150):
            b = bytearray(data)
            for _ in range(int(rng.integers(1, 4))):
                at = int(rng.integers(2, sos + 4))
                how = rng.integers(0, 3)
                if how == 0:
                    b[at] = int(rng.integers(0, 256))
                elif how == 1:
                    b[at] = {0: 0xFF, 1: 0x00, 2: 0xC0, 3: 0xE1}[int(rng.integers(0, 4))]
                else:
                    del b[at:at + int(rng.integers(1, 20))]
            cases.append(bytes(b))
    fast = [_outcome(d) for d in cases]
    fast_gray = [_outcome(d, keep_gray_jpeg=True) for d in cases]
    taken = [d for d in cases if plain_jpeg_size(d, (1, 3))]
    monkeypatch.setattr(sources, "plain_jpeg_size", lambda *a: None)  # PIL decides every file
    assert [_outcome(d) for d in cases] == fast
    assert [_outcome(d, keep_gray_jpeg=True) for d in cases] == fast_gray
    assert len(taken) > 300  # the mutations reach the header-only path, not only PIL's
    for d in taken:
        img = Image.open(io.BytesIO(d))
        assert img.format == "JPEG" and img.mode in ("RGB", "L") and img.getexif().get(0x0112) in (None, 1)
        assert plain_jpeg_size(d, (1, 3)) == img.size
