"""Build the offline GPU kit: the wheels a GPU machine without internet access needs to run the GPU
checks (`run.py`) and the accuracy run (`accuracy.py`), with a sha256 manifest, split into parts of a
size you choose (for a USB stick, a file-size limit on a transfer, an e-mail attachment).

Run it where PyPI is reachable (`make gpu-kit` does, with the Makefile's GPU_* variables):

    python benchmarks/gpu/prepare.py --python 3.12 --cuda 13 --dest gpu-kit --part-mib 1900

It downloads exactly the wheels for the GPU machine's Python (`--python`) on x86-64 Linux: DALI built
for its CUDA major version (`--cuda 12`: nvidia-dali-cuda120, `--cuda 13`: nvidia-dali-cuda130, the
same DALI version as the project's), webdataset and pyyaml with their dependencies. Without --torch it
leaves out what the machine's own torch brings (numpy, typing-extensions): that kit is for a machine that
has torch and torchvision with CUDA already. With --torch it also brings the project's torch and
torchvision pins with every dependency (the CUDA libraries included: about 3-4 GiB). PyPI's Linux wheels
of torch 2.14.1 are built for CUDA 13; for a CUDA 12 machine give --torch-index, the URL of a PyTorch
wheel index built for your CUDA 12 (pytorch.org's install selector shows it). The wheels go into one
uncompressed tar, split into parts of at most --part-mib MiB under --dest, with manifest.json: every
wheel and part with its sha256.

Copy the whole --dest folder to the GPU machine (with this project), then there:

    python benchmarks/gpu/run.py --install gpu-kit --out gpu-results

which reassembles the parts, checks every sha256, installs the wheels offline into .gpu-site/ and runs
the checks (results in gpu-results/results.md and results.json).
"""

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

DALI_VERSION = "2.4.0"  # = the project's nvidia-dali-cuda120 pin
CUDA_MAJORS = ("12", "13")


def packages(cuda: str) -> list[str]:
    return [f"nvidia-dali-cuda{cuda}0=={DALI_VERSION}", "webdataset==1.0.2", "pyyaml"]


TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")  # = the project's pins (pyproject.toml)
ON_DEVICE = ("numpy", "typing_extensions")  # wheels' names (normalised) the machine's torch already has
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def wheel_versions(wheels) -> list[tuple[str, str]]:
    """(normalised name, version) of each wheel file (a folder: its *.whl), from the file names."""
    files = sorted(Path(wheels).glob("*.whl")) if isinstance(wheels, (str, Path)) else wheels
    return [(re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower(), w.name.split("-")[1]) for w in files]


def split(path: Path, dest: Path, part_bytes: int) -> list[dict]:
    parts = []
    with open(path, "rb") as f:
        while data := f.read(part_bytes):
            p = dest / f"part-{len(parts):02d}"
            p.write_bytes(data)
            parts.append({"name": p.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return parts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default="3.12", help="the GPU machine's Python version, e.g. 3.11 (default: 3.12)")
    p.add_argument("--cuda", default="13", choices=CUDA_MAJORS,
                   help="the GPU machine's CUDA major version (`nvidia-smi` shows the driver's; default: 13)")
    p.add_argument("--dest", default="gpu-kit", help="output folder, emptied first (default: gpu-kit)")
    p.add_argument("--part-mib", type=float, default=1900,
                   help="largest part in MiB (default: 1900, under the 4 GiB file limit of FAT32 USB sticks)")
    p.add_argument("--require", default=None,
                   help="a wheel name prefix that must be among them (default: the DALI wheel for --cuda; empty: "
                        "none)")
    p.add_argument("--torch", action="store_true",
                   help=f"also bring {' and '.join(TORCH_PINS)} with their CUDA libraries, for a GPU machine without "
                        "them (about 3-4 GiB more)")
    p.add_argument("--torch-index", default=None, metavar="URL",
                   help="the wheel index torch and torchvision come from (default: your pip's, where PyPI's Linux "
                        "wheels are CUDA 13 builds); needed with --torch --cuda 12")
    p.add_argument("--wheels", default=None, help="use the wheels already in this folder instead of downloading")
    args = p.parse_args(argv)
    if args.torch_index and not args.torch:
        p.error("--torch-index: only with --torch")
    if args.torch and args.cuda == "12" and not args.torch_index and not args.wheels:
        p.error("--torch --cuda 12: PyPI's Linux torch wheels are CUDA 13 builds; give --torch-index URL, a PyTorch "
                "wheel index built for your CUDA 12 (pytorch.org's install selector shows it)")
    if not re.fullmatch(r"3\.\d{1,2}", args.python):
        p.error(f"--python: expected a version like 3.12, got {args.python!r}")
    if args.part_mib <= 0:
        p.error(f"--part-mib: must be positive, got {args.part_mib}")
    if args.require is None:
        args.require = f"nvidia_dali_cuda{args.cuda}0"
    pkgs = packages(args.cuda)
    abi = "cp" + args.python.replace(".", "")
    dest = Path(args.dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-wheels-"))
    try:
        wheels_dir = Path(args.wheels) if args.wheels else work / "wheels"
        if not args.wheels:
            pip = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", args.python,
                   "--implementation", "cp", "--abi", abi, *[a for pl in PLATFORMS for a in ("--platform", pl)],
                   "-d", str(wheels_dir)]
            pinned = []
            if args.torch:  # first, from its own index: the CUDA build the machine needs, with its dependencies
                print(f"downloading for Python {args.python}, CUDA {args.cuda}:", " ".join(TORCH_PINS),
                      f"from {args.torch_index}" if args.torch_index else "", flush=True)
                index = ["--index-url", args.torch_index] if args.torch_index else []
                subprocess.run([*pip, *index, *TORCH_PINS], check=True, stdout=subprocess.DEVNULL)
                # the rest resolves against what torch brought (numpy, pillow, ...): one version of each
                constraints = work / "constraints.txt"
                constraints.write_text("".join(f"{n}=={v}\n" for n, v in wheel_versions(wheels_dir)))
                pinned = ["-c", str(constraints)]
            print(f"downloading for Python {args.python}, CUDA {args.cuda}:", " ".join(pkgs), flush=True)
            subprocess.run([*pip, *pinned, *pkgs], check=True, stdout=subprocess.DEVNULL)
        wheels = sorted(w for w in wheels_dir.glob("*.whl")
                        if args.torch or not w.name.lower().startswith(ON_DEVICE))
        names = [n for n, _ in wheel_versions(wheels)]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            print(f"prepare: more than one version of {', '.join(twice)} among {wheels_dir}'s wheels; an offline "
                  "install takes one of each", file=sys.stderr)
            return 2
        needed = [r for r in (args.require, *(("torch-", "torchvision-") if args.torch else ())) if r]
        missing = [r for r in needed if not any(w.name.startswith(r) for w in wheels)]
        if not wheels or missing:
            print(f"prepare: no {', '.join(m.rstrip('-') for m in missing) or 'wheel'} among {wheels_dir}'s wheels",
                  file=sys.stderr)
            return 2
        bundle = work / "wheels.tar"
        with tarfile.open(bundle, "w") as tar:  # wheels are zips already: no compression
            for w in wheels:
                tar.add(w, arcname=w.name)
        parts = split(bundle, dest, max(1, int(args.part_mib * 2**20)))
        manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "packages": [*(TORCH_PINS if args.torch else ()), *pkgs], "torch_index": args.torch_index,
                    "python": args.python, "cuda": args.cuda, "platforms": PLATFORMS, "bundle_sha256": sha256(bundle),
                    "bundle_bytes": bundle.stat().st_size, "parts": parts,
                    "wheels": [{"name": w.name, "bytes": w.stat().st_size, "sha256": sha256(w)} for w in wheels]}
        (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        print(f"{len(wheels)} wheels, {manifest['bundle_bytes'] / 2**20:,.0f} MiB in {len(parts)} parts under {dest}/:")
        for part in parts:
            print(f"  {part['name']}  {part['bytes'] / 2**20:5.1f} MiB  {part['sha256'][:16]}")
        print(f"copy {dest}/ and this project to the GPU machine, then there: "
              f"python benchmarks/gpu/run.py --install {dest} --out gpu-results")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
