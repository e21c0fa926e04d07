"""Shared fixtures: a real local Ray cluster, a real MLflow server, and tiny datasets made on the fly."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline  # noqa: F401  (sets the loopback-only Ray defaults before ray is imported)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
# Ray Train's controller looks at its workers every 2 s by default: a finished or killed worker is seen up
# to 2 s late, once per replica. The Ray clusters the tests start (and the processes they start) look every
# 0.5 s; what is checked is the same.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


# The longest test files (about 40 s and more each, end-to-end trainings and fault tests), longest first.
# `make test TEST_WORKERS=2` runs files two at a time (pytest-xdist, --dist loadfile --no-loadscope-reorder),
# handing each process the next file in collection order: these go first so that no long file starts last
# while the other process idles.
LONGEST_FILES = ["test_kill.py", "test_train_e2e.py", "test_s3.py", "test_gpu_placement.py", "test_s3_fencing.py",
                 "test_s3_writers.py", "test_e2e.py", "test_replica_planning.py", "test_mlflow_ux.py",
                 "test_gpu_accuracy.py", "test_gpu_runner.py", "test_serving.py", "test_googlenet.py"]


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: the files in their usual order
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable: each file's tests keep their order)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up within {timeout}s\n{tail}")


def http_ok(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=3)
        return True
    except Exception:
        return False


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a process we started in its own session, and everything in its process group: SIGTERM to the
    leader alone (it stops its own children), `timeout` seconds for it to exit, then SIGKILL to what is
    left in its group and its session. (SIGTERM to a whole Ray head group has each process wait out the
    others for 30 s.)"""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:  # children that outlived the leader
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    # Ray's workers each lead a process group of their own, in the session: one whose process hangs at its
    # exit (seen: a TrainController after its actor ended, 1 GB held) would outlive its cluster
    subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], capture_output=True)


@dataclass
class RayCluster:
    address: str  # GCS address for ray.init
    dashboard_url: str  # job server for `ray job submit`
    env: dict  # environment for subprocesses that should join this cluster
    temp_dir: Path | None = None  # Ray's --temp-dir: session logs under session_latest/logs

    def worker_logs(self) -> list[Path]:
        """Ray's own per-process log files of the worker processes (worker-<id>-<job>-<pid>.out)."""
        return sorted((self.temp_dir / "session_latest" / "logs").glob("worker-*.out")) if self.temp_dir else []


# Ray's `memory` resource defaults to 70% of the memory available when a node starts: with two test files
# running at once it would depend on what the other one holds at that moment. The tests' clusters get what
# Ray gives on this machine when idle, so that plans bound by memory are the same in every run.
def _machine_memory() -> int:
    """Physical memory, or the container's limit where one is set (cgroup v2, as Ray reads it)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        return min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        return total


RAY_MEMORY = int(0.7 * _machine_memory())


def cluster_head_args(**args) -> dict:
    """`head_node_args` for Ray's `cluster_utils.Cluster` in the tests' helper scripts: ports of its own
    (Ray's defaults would collide with another test's cluster) and RAY_MEMORY unless `memory` is given."""
    return {"dashboard_port": free_port(), "ray_client_server_port": free_port(),
            "dashboard_agent_listen_port": free_port(), "memory": RAY_MEMORY, **args}


@contextlib.contextmanager
def local_ray(**head_args):
    """A `ray.cluster_utils.Cluster` head (`cluster_head_args(**head_args)`) for the tests' helper scripts, which
    this process joins until the block ends; then the cluster is shut down. RAY_ADDRESS names it in this
    process's environment, which its processes inherit: without it, with another Ray cluster on this machine,
    Ray's own address lookups (Ray Train's placement-group cleaner asks the state API every second, per
    replica) find several and warn each time, in every replica's log."""
    import ray
    from ray.cluster_utils import Cluster

    port = free_port()
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    cluster = Cluster(initialize_head=True, head_node_args=cluster_head_args(gcs_server_port=port, **head_args))
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


RAY_STOP_S = 2  # a Ray head that has run Ray Train takes 30 s to stop on SIGTERM; nothing of it is kept


@contextlib.contextmanager
def ray_head(prefix: str, base_env: dict | None = None, env_of=lambda tmp: {}, join_env: dict | None = None):
    """A real Ray head (2 CPUs) on loopback with its job server, on free ports, in a temp folder of its own;
    its processes get `base_env` (default: this environment) plus `env_of(folder)`. Yields a RayCluster
    whose `env` joins it (RAY_ADDRESS, plus `join_env`)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: Ray's socket paths are limited
    port, dash = free_port(), free_port()
    log = tmp / "ray.log"
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--temp-dir", str(tmp), "--num-cpus", "2", "--memory", str(RAY_MEMORY)]
    env = {**(os.environ if base_env is None else base_env), "PATH": f"{BIN}:{os.environ['PATH']}", **env_of(tmp)}
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{dash}/api/version"), 120, "ray head", proc, log)
        yield RayCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}",
                         {**env, "RAY_ADDRESS": f"127.0.0.1:{port}", **(join_env or {})}, tmp)
    finally:
        stop_group(proc, timeout=RAY_STOP_S)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray head on loopback with its job server, on free ports; the test process joins it."""
    with ray_head("ipray-") as cluster:
        import ray

        ray.init(address=cluster.address, log_to_driver=True, configure_logging=False)
        yield cluster
        ray.shutdown()


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    """A filesystem of `size` (tmpfs) mounted at `path`, grown with `grow_tmpfs`: a disk that fills up.
    Mounting needs root (CAP_SYS_ADMIN); elsewhere the test is skipped, saying so."""
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def grow_tmpfs(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


@contextlib.contextmanager
def mlflow_server_process(tmp: Path, artifacts: str | None = None, env: dict | None = None, args: tuple = (),
                          what: str = "mlflow server", stop_timeout: float = 30, port: int | None = None):
    """A real MLflow tracking server (SQLite in `tmp`, artifacts in `tmp`/artifacts or `artifacts`) on a
    free loopback port (or `port`: a server started again where it was), stopped by its process group;
    yields its URL. `args` go right after `server`."""
    port = port or free_port()
    log = tmp / f"mlflow-{time.time_ns()}.log"
    cmd = [str(BIN / "mlflow"), "server", *args, "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db", "--artifacts-destination", artifacts or str(tmp / "artifacts")]
    # (as make up starts it: without MLflow's job runner, whose worker processes the pipeline never uses)
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(os.environ if env is None else env)}
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 600, what, proc, log)  # (a busy machine: minutes)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc, timeout=stop_timeout)


@pytest.fixture(scope="session")
def mlflow_server():
    """A real MLflow tracking server (SQLite + local artifacts) on a free loopback port."""
    tmp = Path(tempfile.mkdtemp(prefix="ipmlflow-"))
    try:
        with mlflow_server_process(tmp) as url:
            yield url
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str  # created for the session
    env: dict  # the standard AWS variables pointing at this server (boto3, pyarrow, DALI and Ray read them)

    def uri(self, *keys: str) -> str:
        return "/".join([f"s3://{self.bucket}", *keys])


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's, from `moto[server]`) on a free loopback port with one bucket:
    the stand-in for AWS S3, MinIO or another S3 API (GCS through its interoperability endpoint)."""
    import boto3

    tmp = Path(tempfile.mkdtemp(prefix="ips3-"))
    port = free_port()
    log = tmp / "moto.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/moto-api/"), 60, "moto server", proc, log)
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test-key",
               "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_REGION": "us-east-1"}
        bucket = f"inception-test-{port}"
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                     aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
        yield S3Server(env["AWS_ENDPOINT_URL"], bucket, env)
    finally:
        stop_group(proc)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """This process pointed at the session's S3 server (and a fresh node-local shard cache)."""
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(k, raising=False)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("INCEPTION_SHARD_CACHE", str(tmp_path / "shard-cache"))
    return s3_server


# ---------------------------------------------------------------- tiny datasets made by the tests

@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """200 grey 28x28 training images and 40 validation images (10 classes), per test module."""
    d = tmp_path_factory.mktemp("small")
    write_test_split(d / "train", [jpeg_bytes((28, 28), mode="L", seed=i) for i in range(200)],
                     [i % 10 for i in range(200)], per_shard=64)
    write_test_split(d / "val", [jpeg_bytes((28, 28), mode="L", seed=1000 + i) for i in range(40)],
                     [i % 10 for i in range(40)])
    return d



def jpeg_bytes(size=(64, 48), mode="RGB", seed=0, quality=90) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(size=(40, 30), seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def make_fashion_mnist(root: Path, n_train=60, n_val=20, seed=0) -> Path:
    """Fashion-MNIST-shaped IDX files with random 28x28 images and labels 0-9."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


WNIDS = ["n01440764", "n01443537", "n01484850"]


def make_imagenet(root: Path, per_class=6, bad=True) -> dict:
    """A tiny ILSVRC layout: train/<wnid>/*.JPEG and a flat val/ with LOC_val_solution.csv.

    With bad=True it also holds every kind of bad input the shard job must survive. Returns what
    was planted: {"good": n, "skipped": {name: reason-substring}, "repaired": {name: ...}}.
    """
    planted = {"good": 0, "skipped": {}, "repaired": {}}
    for ci, wnid in enumerate(WNIDS):
        d = root / "train" / wnid
        d.mkdir(parents=True)
        for j in range(per_class):
            (d / f"{wnid}_{j}.JPEG").write_bytes(jpeg_bytes(seed=ci * 100 + j, size=(60 + j, 40 + ci)))
            planted["good"] += 1
    (root / "train" / "n09999999").mkdir()  # empty class folder: the class is kept, with a warning
    if bad:
        d = root / "train" / WNIDS[0]
        good = jpeg_bytes(seed=999, size=(80, 60))
        (d / "trunc.JPEG").write_bytes(good[: len(good) // 2])
        planted["skipped"]["trunc.JPEG"] = "truncated"
        (d / "zero.JPEG").write_bytes(b"")
        planted["skipped"]["zero.JPEG"] = "empty file"
        (d / "text.JPEG").write_bytes(b"<html>this is not an image</html>\n")
        planted["skipped"]["text.JPEG"] = "not a decodable image"
        os.symlink(root / "does-not-exist.JPEG", d / "unreadable.JPEG")
        planted["skipped"]["unreadable.JPEG"] = "unreadable"
        d = root / "train" / WNIDS[1]
        (d / "png.JPEG").write_bytes(png_bytes())
        planted["repaired"]["png.JPEG"] = "PNG"
        (d / "cmyk.JPEG").write_bytes(jpeg_bytes(mode="CMYK", seed=5))
        planted["repaired"]["cmyk.JPEG"] = "CMYK"
        (d / "gray.JPEG").write_bytes(jpeg_bytes(mode="L", seed=6))
        planted["repaired"]["gray.JPEG"] = "JPEG L"
    val = root / "val"
    val.mkdir()
    rows = ["ImageId,PredictionString"]
    for i in range(6):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        (val / f"{name}.JPEG").write_bytes(jpeg_bytes(seed=500 + i))
        rows.append(f"{name},{WNIDS[i % 3]} 1 2 30 40 {WNIDS[i % 3]} 3 4 20 20")
    (val / "ILSVRC2012_val_00000099.JPEG").write_bytes(jpeg_bytes(seed=7))  # no label row
    (val / "ILSVRC2012_val_00000098.JPEG").write_bytes(jpeg_bytes(seed=8))
    rows.append("ILSVRC2012_val_00000098,n00000000 1 1 2 2")  # a wnid that is not a class
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return planted


def write_photo_folder(root: Path, classes: int = 4, per_class: int = 100) -> Path:
    """An ILSVRC-style train/<wnid>/ folder of photo-like 500x375 JPEGs (~100 KB each)."""
    from benchmarks.synthetic import photo_jpeg

    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / "train" / f"n{c + 1:08d}"
        d.mkdir(parents=True)
        for j in range(per_class):
            (d / f"n{c + 1:08d}_{j}.JPEG").write_bytes(photo_jpeg(c * per_class + j, rng))
    return root


@pytest.fixture
def tiny_imagenet(tmp_path):
    root = tmp_path / "imagenet"
    planted = make_imagenet(root)
    return root, planted


@pytest.fixture
def tiny_fmnist(tmp_path):
    return make_fashion_mnist(tmp_path / "fmnist")


def _size(data: bytes) -> dict:
    try:
        w, h = Image.open(io.BytesIO(data)).size
    except Exception:  # a deliberately corrupt test image
        w, h = 1, 1
    return {"width": w, "height": h}


def grey_shards(d: Path, n_train: int, n_val: int = 16) -> Path:
    """`d`/train and `d`/val: grey 28x28 JPEGs of 10 classes (Fashion-MNIST's shape), for placement runs."""
    write_test_split(d / "train", [jpeg_bytes((28, 28), mode="L", seed=i) for i in range(n_train)],
                     [i % 10 for i in range(n_train)])
    write_test_split(d / "val", [jpeg_bytes((28, 28), mode="L", seed=500 + i) for i in range(n_val)],
                     [i % 10 for i in range(n_val)])
    return d


def write_test_split(d: Path, images: list[bytes], labels: list[int], per_shard: int = 50,
                     classes: list[str] | None = None) -> Path:
    """A complete split (tars, DALI index files, manifest) written with the library's own writer."""
    from pipeline.shards.format import ShardSample
    from pipeline.shards.splits import write_split

    samples = (ShardSample(f"s{i:06d}", labels[i], images[i], {"source": f"#{i}", **_size(images[i])})
               for i in range(len(images)))
    write_split(d, samples, classes or [str(i) for i in range(max(labels) + 1)], per_shard, prefix="test-split")
    return d


def solid_jpeg(rgb, size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, tuple(rgb)).save(buf, format="JPEG", quality=100)
    return buf.getvalue()


def ramp_png(width=240, height=160) -> bytes:
    """R encodes x, G encodes y (0..255 across the image): a crop's window can be read off its pixels."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    arr = np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def declared_size_jpeg(width: int, height: int) -> bytes:
    """A few hundred bytes of valid JPEG whose frame header declares width x height (a decompression bomb:
    the header is all a reader sizes its buffers by)."""
    data = bytearray(jpeg_bytes(size=(16, 16), seed=3))
    sof = data.index(b"\xff\xc0")  # baseline frame header: marker, length, precision, height, width
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def png16_bytes(width: int = 80, height: int = 60) -> tuple[bytes, np.ndarray]:
    """A 16-bit grayscale PNG (PIL mode I;16): a horizontal ramp over 0..62258, and its samples."""
    x = np.linspace(0, 65535, width)[None, :].repeat(height, 0)
    arr = (x * 0.95).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue(), arr
