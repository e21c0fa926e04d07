"""Serving under load: `mlflow models serve` of the googlenet-ensemble pyfunc, concurrent clients.

Starts `mlflow models serve` on 127.0.0.1 (one worker) with either a given model (`--model`, any MLflow
model URI) or an ensemble of random-weight GoogLeNets saved to a temporary folder (`--replicas`,
`--input-size`: the same work per image as a trained one). Then, in interleaved rounds (1, 10, 144 crops,
1, 10, 144, ...), `--clients` threads send requests for `--seconds` each: `--images` images a request,
photo-like 500x375 JPEGs (or `--small`: 28x28 grayscale), and one request in `--invalid-every` carrying a
bad row (not an image, truncated, bad base64, a header declaring 12000x12000 pixels; in turn). Prints per
crop count the medians over rounds of images/s and of the rounds' p50/p99 latencies (of the answered
valid requests), the answers by kind
(200, 400 for the bad requests, anything else: 5xx or a refused connection), and the server's peak
memory (RSS of its process group, sampled every 0.2 s) per round, to show whether memory stays flat.
Target on a laptop CPU: zero 5xx, and peak memory flat across the rounds.

    python benchmarks/serving.py [--clients 4] [--seconds 20] [--rounds 3] [--crops 1,10,144] [--replicas 2]
"""

import argparse
import base64
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.synthetic import gray_jpeg, photo_jpeg  # noqa: E402

BIN = Path(sys.executable).parent


def bad_rows(good: bytes) -> list[tuple[str, str]]:
    """(kind, base64 string) of the invalid rows sent, in turn."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="JPEG")
    bomb = bytearray(buf.getvalue())
    sof = bomb.index(b"\xff\xc0")
    bomb[sof + 5:sof + 9] = (12000).to_bytes(2, "big") * 2
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return [("not an image", b64(b"plain text, not an image")), ("truncated", b64(good[: len(good) // 3])),
            ("bad base64", "@@ not base64 @@"), ("declared 12000x12000", b64(bytes(bomb)))]


def group_rss(pgid: int) -> int:
    """Resident memory in bytes of every process in a process group."""
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.getpgid(int(d)) != pgid:
                continue
            with open(f"/proc/{d}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except (OSError, ProcessLookupError):
            continue
    return total


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(work / "serve.log", "wb")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow models serve exited ({proc.returncode}); see {work / 'serve.log'}")
        try:
            urllib.request.urlopen(f"{url}/ping", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    raise SystemExit("mlflow models serve did not answer /ping within 300 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def load_phase(url: str, crops: int, args, good: list[str], bad: list[tuple[str, str]], pgid: int) -> dict:
    """`args.clients` threads for `args.seconds`; returns images/s, latencies, answers by kind, peak RSS."""
    stop = time.monotonic() + args.seconds
    lock = threading.Lock()
    latencies, kinds, answered, peak = [], Counter(), [0], [group_rss(pgid)]
    counter = [0]

    def client(c: int) -> None:
        while time.monotonic() < stop:
            with lock:
                counter[0] += 1
                n = counter[0]
            rows = [good[(n + i) % len(good)] for i in range(args.images)]
            invalid = args.invalid_every and n % args.invalid_every == 0
            if invalid:
                kind, row = bad[(n // args.invalid_every) % len(bad)]
                rows[0] = row
            body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[r] for r in rows]},
                               "params": {"crops": crops, "top_k": 5}}).encode()
            req = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    r.read()
                    status = r.status
            except urllib.error.HTTPError as e:
                status = e.code
            except OSError as e:
                status = f"connection error ({type(e).__name__})"
            dt = time.perf_counter() - t0
            with lock:
                if status == 200 and not invalid:
                    latencies.append(dt)  # (of answered requests: a refused one costs no crops)
                label = ("valid" if not invalid else f"invalid: {kind}")
                kinds[f"{label} -> {status}"] += 1
                if status == 200:
                    answered[0] += len(rows)

    def sample() -> None:
        while time.monotonic() < stop:
            peak[0] = max(peak[0], group_rss(pgid))
            time.sleep(0.2)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    threads.append(threading.Thread(target=sample, daemon=True))
    for t in threads:
        t.start()
    for t in threads[:-1]:
        t.join()
    wall = time.perf_counter() - t0
    q = np.quantile(latencies, [0.5, 0.99]) if latencies else [float("nan")] * 2
    return {"images_per_s": answered[0] / wall, "p50_s": float(q[0]), "p99_s": float(q[1]),
            "requests": len(latencies), "kinds": dict(kinds), "peak_rss": peak[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--model", help="an MLflow model URI to serve (default: random-weight replicas)")
    p.add_argument("--replicas", type=int, default=2, help="random-weight replicas (default: 2)")
    p.add_argument("--input-size", type=int, default=32, help="their input size (default: 32, the demo's)")
    p.add_argument("--crops", default="1,10,144", help="crop counts, interleaved (default: 1,10,144)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default: 4)")
    p.add_argument("--seconds", type=float, default=20, help="per crop count and round (default: 20)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians printed (default: 3)")
    p.add_argument("--images", type=int, default=2, help="images per request (default: 2)")
    p.add_argument("--invalid-every", type=int, default=5, help="one request in N has a bad row (0: none)")
    p.add_argument("--small", action="store_true", help="28x28 grayscale images instead of 500x375 photos")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    crops = [int(c) for c in args.crops.split(",")]
    if not set(crops) <= {1, 10, 144} or args.clients < 1 or args.seconds <= 0 or args.rounds < 1:
        p.error("--crops from 1,10,144; --clients, --seconds, --rounds positive")

    rng = np.random.default_rng(0)
    images = [gray_jpeg(rng) if args.small else photo_jpeg(i, rng) for i in range(16)]
    good = [base64.b64encode(b).decode() for b in images]
    bad = bad_rows(images[0])
    work = Path(tempfile.mkdtemp(prefix="servebench-"))
    try:
        model = args.model
        if not model:
            from types import SimpleNamespace

            import torch

            from pipeline.model.googlenet import GoogLeNet
            from pipeline.serving import save_ensemble_model

            reps = []
            for i in range(args.replicas):
                torch.manual_seed(i)
                reps.append(SimpleNamespace(index=i, strategy="inception", variant="bn",
                                            state_dict=GoogLeNet(10, variant="bn").state_dict()))
            model = str(work / "model")
            save_ensemble_model(model, reps, [str(c) for c in range(10)], args.input_size)
        print(f"serving {model if args.model else f'{args.replicas} random-weight replicas at {args.input_size}px'}"
              f"; {args.clients} clients x {args.images} images/request, "
              f"{'28x28 grayscale' if args.small else '500x375 photos'}, {args.seconds:g} s per phase, "
              f"{args.rounds} interleaved rounds, {len(os.sched_getaffinity(0))} CPUs", flush=True)
        proc, url = start_server(model, work)
        try:
            base_rss = group_rss(proc.pid)
            res, died = {c: [] for c in crops}, False
            for r in range(args.rounds):
                for c in crops if not died else []:
                    out = load_phase(url, c, args, good, bad, proc.pid)
                    res[c].append(out)
                    print(f"  round {r + 1} crops {c:>3}: {out['images_per_s']:8.1f} images/s, p50 "
                          f"{out['p50_s'] * 1e3:7.0f} ms, p99 {out['p99_s'] * 1e3:7.0f} ms, peak RSS "
                          f"{out['peak_rss'] / 2**20:6.0f} MiB, {out['requests']} requests", flush=True)
                    if proc.poll() is not None:
                        tail = (work / "serve.log").read_text(errors="replace").splitlines()[-15:]
                        print(f"the server exited (code {proc.returncode}); its log ends:\n  " + "\n  ".join(tail))
                        died = True
                        break
        finally:
            stop_server(proc)
        print(f"server RSS before the load: {base_rss / 2**20:.0f} MiB")
        summary = {}
        for c in (c for c in crops if res[c]):
            kinds = Counter()
            for out in res[c]:
                kinds.update(out["kinds"])
            # failures: a valid request not answered 200, a bad one not refused with 400 (5xx, resets)
            fivexx = sum(n for k, n in kinds.items()
                         if not (k.startswith("valid") and k.endswith("-> 200"))
                         and not (k.startswith("invalid") and k.endswith("-> 400")))
            summary[c] = {"images_per_s": statistics.median(o["images_per_s"] for o in res[c]),
                          "p50_s": statistics.median(o["p50_s"] for o in res[c]),
                          "p99_s": statistics.median(o["p99_s"] for o in res[c]),
                          "peak_rss_mib": [round(o["peak_rss"] / 2**20) for o in res[c]],
                          "answers": dict(sorted(kinds.items())), "failures": fivexx}
            s = summary[c]
            print(f"crops {c:>3}: {s['images_per_s']:.1f} images/s, p50 {s['p50_s'] * 1e3:.0f} ms, "
                  f"p99 {s['p99_s'] * 1e3:.0f} ms (medians of {args.rounds}); peak RSS by round "
                  f"{s['peak_rss_mib']} MiB; failures (valid not 200, bad not 400): {fivexx}")
            for k, n in s["answers"].items():
                print(f"    {n:6d}  {k}")
        if died:
            print("the server died during the run: the figures above are not a measurement of it")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "base_rss_mib": round(base_rss / 2**20),
                                                   "server_died": died, "crops": summary}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
