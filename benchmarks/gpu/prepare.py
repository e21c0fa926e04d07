"""Prepare what a lent GPU machine needs and cannot download: DALI for CUDA 13 and its dependencies, as
parts small enough to carry one per device call.

Downloads (here, where PyPI is reachable) exactly the wheels for the device's Python 3.12 / x86-64:
nvidia-dali-cuda130 (the same DALI version as the project's nvidia-dali-cuda120), webdataset and
pyyaml with their dependencies, leaving out what the device's torch already brings (numpy,
typing-extensions). The wheels go into one uncompressed tar, split into parts of at most --part-mib
MiB under --dest (an ignored folder), with manifest.json: every wheel and part with its sha256.

    python benchmarks/gpu/prepare.py [--dest .gpu-carry] [--part-mib 56]

Then, on the device, one call per part, back to back (a warm machine keeps ignored files for 30 s):
    run(command="ls .gpu-carry", carry=[".gpu-carry/manifest.json", ".gpu-carry/part-00"])
    run(command="ls .gpu-carry", carry=[".gpu-carry/part-01"])  ...
and last the runner, which reassembles, verifies and installs before measuring:
    run(command="python benchmarks/gpu/run.py --install .gpu-carry --out $OUT", carry=[".gpu-carry/part-04"])
"""

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

DALI_VERSION = "2.4.0"  # = the project's nvidia-dali-cuda120 pin
PACKAGES = [f"nvidia-dali-cuda130=={DALI_VERSION}", "webdataset==1.0.2", "pyyaml"]
ON_DEVICE = ("numpy", "typing_extensions")  # wheels' names (normalised) the device's torch already has
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def split(path: Path, dest: Path, part_bytes: int) -> list[dict]:
    parts = []
    with open(path, "rb") as f:
        while data := f.read(part_bytes):
            p = dest / f"part-{len(parts):02d}"
            p.write_bytes(data)
            parts.append({"name": p.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return parts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", default=".gpu-carry", help="output folder, git-ignored (default: .gpu-carry)")
    p.add_argument("--part-mib", type=float, default=56, help="part size in MiB; a call carries <= 64 MiB with "
                   "the working tree (default: 56)")
    p.add_argument("--require", default="nvidia_dali_cuda130", help="a wheel name prefix that must be among them "
                   "(default: nvidia_dali_cuda130; empty: none)")
    p.add_argument("--wheels", default=None, help="use wheels already in this folder instead of downloading")
    args = p.parse_args(argv)
    dest = Path(args.dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-wheels-"))
    try:
        wheels_dir = Path(args.wheels) if args.wheels else work / "wheels"
        if not args.wheels:
            cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", "3.12",
                   "--implementation", "cp", "--abi", "cp312", *[a for pl in PLATFORMS for a in ("--platform", pl)],
                   "-d", str(wheels_dir), *PACKAGES]
            print("downloading:", " ".join(PACKAGES), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wheels = sorted(w for w in wheels_dir.glob("*.whl") if not w.name.lower().startswith(ON_DEVICE))
        if not wheels or (args.require and not any(w.name.startswith(args.require) for w in wheels)):
            print(f"prepare: no {args.require or 'wheel'} among {wheels_dir}'s wheels", file=sys.stderr)
            return 2
        bundle = work / "wheels.tar"
        with tarfile.open(bundle, "w") as tar:  # wheels are zips already: no compression
            for w in wheels:
                tar.add(w, arcname=w.name)
        parts = split(bundle, dest, max(1, int(args.part_mib * 2**20)))
        manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "packages": PACKAGES,
                    "python": "3.12", "platforms": PLATFORMS, "bundle_sha256": sha256(bundle),
                    "bundle_bytes": bundle.stat().st_size, "parts": parts,
                    "wheels": [{"name": w.name, "bytes": w.stat().st_size, "sha256": sha256(w)} for w in wheels]}
        (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        print(f"{len(wheels)} wheels, {manifest['bundle_bytes'] / 2**20:,.0f} MiB in {len(parts)} parts under {dest}/:")
        for part in parts:
            print(f"  {part['name']}  {part['bytes'] / 2**20:5.1f} MiB  {part['sha256'][:16]}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
