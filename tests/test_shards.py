"""Tar + DALI index writing, manifests and the reader helpers (no Ray needed)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import jpeg_bytes

from pipeline.shards.format import MANIFEST, ShardError, ShardSample, sha256_file, write_tar
from pipeline.shards.splits import iter_samples, open_split, write_split


def samples(n=5):
    return [ShardSample(f"k{i}", i % 3, jpeg_bytes(seed=i, size=(20 + i, 30)), {"source": f"s{i}", "width": 20 + i})
            for i in range(n)]


def test_index_is_exactly_what_wds2idx_writes(tmp_path):
    tar = tmp_path / "a.tar"
    n, size, digest, index = write_tar(tar, samples(7))
    assert (n, size, digest) == (7, tar.stat().st_size, sha256_file(tar))
    ref = tmp_path / "ref.idx"
    wds2idx = Path(sys.executable).parent / "wds2idx"
    subprocess.run([str(wds2idx), str(tar), str(ref)], check=True, capture_output=True)
    assert index == ref.read_text()


def test_same_samples_give_identical_bytes(tmp_path):
    a = write_tar(tmp_path / "a.tar", samples())
    b = write_tar(tmp_path / "b.tar", samples())
    assert a == b and (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def tarfile_bytes(path: Path, samples) -> bytes:
    """The same samples written member by member with Python's tarfile, as the shard writer did before it
    built its headers itself: the shards must stay byte for byte what they were."""
    import io
    import tarfile

    from pipeline.shards.format import TAR_MTIME

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext, data in s.components():
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid = len(data), TAR_MTIME, 0o644, 0, 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def test_the_writer_gives_tarfiles_bytes(tmp_path):
    odd = [ShardSample("k" * 95, 1, b"", {}),  # "<key>.json" exactly 100 bytes; an empty member
           ShardSample("n01440764_\u00e9t\u00e9_\udcff", 3, jpeg_bytes(seed=2, size=(511, 3)), {"source": "\u00e9"}),
           *samples(40)]
    n, size, digest, _ = write_tar(tmp_path / "ours.tar", odd)
    ours = (tmp_path / "ours.tar").read_bytes()
    assert ours == tarfile_bytes(tmp_path / "ref.tar", odd)
    assert (n, size, digest) == (42, len(ours), sha256_file(tmp_path / "ours.tar"))
    long = [ShardSample("k" * 96, 2, b"x", {})]  # "<key>.json" over USTAR's 100 bytes, no '/' to split at
    with pytest.raises(ValueError, match="name is too long"):
        tarfile_bytes(tmp_path / "long-ref.tar", long)
    with pytest.raises(ValueError, match="name is too long"):
        write_tar(tmp_path / "long.tar", long)
    for k in range(3):  # every record-padding case of the end (tarfile pads to 10,240-byte records)
        write_tar(tmp_path / f"o{k}.tar", samples(k))
        assert (tmp_path / f"o{k}.tar").read_bytes() == tarfile_bytes(tmp_path / f"r{k}.tar", samples(k))


def test_keys_with_dots_are_refused(tmp_path):
    with pytest.raises(ValueError, match="contains"):
        write_tar(tmp_path / "a.tar", [ShardSample("a.b", 0, b"x", {})])


def make_split(tmp_path) -> Path:
    d = tmp_path / "split"
    write_split(d, samples(4), ["a", "b", "c"], per_shard=2, prefix="ds-train")
    return d


def test_open_split_and_iterate_samples(tmp_path):
    d = make_split(tmp_path)
    info = open_split(d, verify="sha256")
    assert info.num_samples == 4 and [p.name for p in info.index_files] == ["ds-train-000000.idx", "ds-train-000001.idx"]
    got = list(iter_samples(info))
    want = samples(4)
    assert [(g["key"], g["label"], g["jpg"], g["meta"]) for g in got] == [(w.key, w.label, w.jpg, w.meta) for w in want]


def test_split_without_manifest_is_rejected(tmp_path):
    d = make_split(tmp_path)
    (d / MANIFEST).unlink()
    with pytest.raises(ShardError, match="no manifest.json"):
        open_split(d)


def test_damaged_shards_are_named(tmp_path):
    d = make_split(tmp_path)
    tar = d / "ds-train-000001.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    open_split(d, verify="size")  # same size: only the hash can tell
    with pytest.raises(ShardError, match="ds-train-000001.tar: sha256"):
        open_split(d, verify="sha256")
    tar.write_bytes(bytes(data[:-512]))
    with pytest.raises(ShardError, match="ds-train-000001.tar: .* bytes"):
        open_split(d)
    (d / "ds-train-000000.idx").unlink()
    with pytest.raises(ShardError, match="index file .*000000.idx is missing"):
        open_split(d)
    shutil.rmtree(d)
    d = make_split(tmp_path)
    (d / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ShardError, match="format"):
        open_split(d)


def test_a_bogus_index_file_is_refused(tmp_path):
    d = make_split(tmp_path)
    idx = d / "ds-train-000001.idx"
    good = idx.read_text()
    bogus = good.replace(" 512 ", " 513 ", 1)  # an offset one byte off: the same size
    assert bogus != good and len(bogus) == len(good)
    idx.write_text(bogus)
    open_split(d, verify="size")  # same size: only the hash can tell
    with pytest.raises(ShardError, match="index file .*000001.idx: sha256 differs"):
        open_split(d, verify="sha256")
    idx.write_text(good + "\n")
    with pytest.raises(ShardError, match="index file .*000001.idx: .* bytes"):
        open_split(d)
    # a manifest from before index files were recorded: its index files are checked for presence only
    m = json.loads((d / MANIFEST).read_text())
    for s in m["shards"]:
        del s["index_bytes"], s["index_sha256"]
    (d / MANIFEST).write_text(json.dumps(m))
    assert open_split(d, verify="sha256").num_samples == 4
