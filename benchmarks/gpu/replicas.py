"""The accuracy runner's replicas (benchmarks/gpu/accuracy.py): one process per replica running
`pipeline.train.loop.train_replica` in-process (no Ray), at most --concurrent at once on the one GPU.

In budget mode the first wave trains its calibration epoch(s), reports them (a CALIBRATED line), and
waits on stdin for the number of epochs (`budget.fit_epochs` on those measurements); it then calls
`train_replica` again with that length, which resumes from the checkpoint (model, optimiser, Polyak
state and data position). Later replicas start with the number known. A replica process writes its
output to logs/replica-<i>.log; it dies with the runner (PR_SET_PDEATHSIG), and the runner stops the
running ones at the training deadline (SIGTERM, then SIGKILL), keeping their last finished epoch.

    python benchmarks/gpu/replicas.py SPEC.json     # one replica; started by accuracy.py, not by hand
"""

import time

T0 = time.monotonic()  # this process's start: a replica's start-up time is measured from here

import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections import deque  # noqa: E402
from pathlib import Path  # noqa: E402


def replica_config(cfg, i: int, local_dir: Path, log_every: int) -> dict:
    """The dict `train_replica` takes, as the ensemble driver (`fit_replica`) builds it: strategy, data
    seed and init seed per replica from the driver's own helpers; a local checkpoint folder instead of
    Ray Train's, no MLflow. No corrupt-image scan: the shards were just encoded from the IDX arrays by
    this run, and a single process would skip a bad image lazily anyway."""
    from pipeline.data.sampling import strategy_for_replica
    from pipeline.train.ensemble import init_seed, replica_seed

    return {"train": cfg.to_dict(), "replica": i, "strategy": strategy_for_replica(i, cfg.data.input_size).name,
            "seed": replica_seed(cfg.ensemble.seed, i), "init_seed": init_seed(cfg.ensemble, i), "exclude": [],
            "mlflow_uri": None, "mlflow_run_id": None, "local_dir": str(local_dir), "run_dir": None,
            "log_every": log_every}


def worker(spec_path: str) -> int:
    """Child process: one replica. With epochs unknown, trains the calibration epoch(s), prints
    CALIBRATED {...}, reads `EPOCHS n` (or STOP) on stdin and goes on from its checkpoint."""
    _die_with_parent()
    spec = json.loads(Path(spec_path).read_text())
    import torch

    from pipeline.train.loop import train_replica

    torch.set_num_threads(spec["threads"])
    config, epochs, done = spec["config"], spec["epochs"], 0
    out = {"replica": config["replica"], "startup_s": time.monotonic() - T0, "calls": []}

    def call(n: int) -> dict:
        d = copy.deepcopy(config)
        d["train"]["schedule"]["epochs"] = n
        t = time.monotonic()
        r = train_replica(d)
        out["calls"].append({"epochs": n, "seconds": time.monotonic() - t})
        return r

    if epochs is None:
        c = spec["calib_epochs"]
        hist = call(c)["history"][-c:]
        call_s = out["calls"][-1]["seconds"]
        epoch_s = [m.get("train/epoch_s", call_s / c) for m in hist]
        out["calibration"] = {"startup_s": out["startup_s"], "call_s": call_s, "epoch_s": max(epoch_s),
                              "overhead_s": max(0.0, call_s - sum(epoch_s)),
                              "images_per_s": [m.get("data/images_per_s") for m in hist]}
        print("CALIBRATED " + json.dumps(out["calibration"]), flush=True)
        words = sys.stdin.readline().split()
        if len(words) != 2 or words[0] != "EPOCHS":
            print(f"told to stop after calibration ({' '.join(words) or 'stdin closed'})", flush=True)
            return 3
        epochs, done = int(words[1]), c
    if epochs > done:
        call(epochs)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


class Worker:
    """A replica's process; a thread copies its output to logs/replica-<i>.log and echoes epoch lines."""

    def __init__(self, i: int, strategy: str, spec: dict, work: Path, logs: Path, env: dict, log):
        self.i, self.strategy, self.log = i, strategy, log
        self.calib = self.result = None
        self.epochs_done, self.status, self.told, self.ended = 0, "running", None, None
        self.tail: deque = deque(maxlen=30)
        spec_path = work / f"replica-{i}.json"
        spec_path.write_text(json.dumps(spec))
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(spec_path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1, env=env, cwd=Path(__file__).resolve().parents[2])
        self.log_path = logs / f"replica-{i}.log"
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with open(self.log_path, "w") as f:
            for line in self.proc.stdout:
                f.write(line)
                f.flush()
                self.tail.append(line.rstrip())
                if line.startswith("CALIBRATED "):
                    calib = json.loads(line[11:])
                    # start-up as the runner sees it: spawn and interpreter start too, not only imports
                    calib["startup_s"] = max(calib["startup_s"], time.monotonic() - self.started - calib["call_s"])
                    self.calib = calib
                elif line.startswith("RESULT "):
                    self.result = json.loads(line[7:])
                elif " done: " in line and " epoch " in line:
                    self.epochs_done += 1
                    self.log("  " + line.strip())

    def tell(self, words: str) -> None:
        self.told = words
        try:
            self.proc.stdin.write(words + "\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass

    def stop(self) -> None:
        """SIGTERM to the replica's process, SIGKILL after 10 s (it starts no processes of its own)."""
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        self.thread.join(5)


def _die_with_parent() -> None:
    """A replica process ends when the runner does, even by SIGKILL (a run cut at its time
    limit must leave no training behind): Linux's PR_SET_PDEATHSIG."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the runner died before prctl took effect
        os._exit(1)


def train(cfg, args, work: Path, out: Path, env: dict, deadline: float | None, eval_s: float,
          reserve_s: float, results: dict, run_start: float, log=print) -> None:
    """Train every replica (see the module docstring); fills results["replicas"], results["budget"]["plan"]
    and results["recipe"]["epochs"]. `args`: the runner's (budget_s, epochs, max_epochs, concurrent,
    log_every); `deadline` and `run_start`: time.monotonic() values."""
    from benchmarks.gpu.budget import calibration_epochs, fit_epochs
    from pipeline.data.sampling import strategy_for_replica

    n_rep = cfg.ensemble.replicas
    conc = min(args.concurrent, n_rep)
    threads = max(1, (os.cpu_count() or 1) // conc)
    fixed = args.epochs is not None
    calib_e = None if fixed else calibration_epochs(cfg.schedule.shape, cfg.schedule.warmup_epochs)
    epochs = args.epochs if fixed else None
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, finished, wave1 = list(range(n_rep)), {}, {}, []
    t0, last = time.monotonic(), 0.0
    log(f"train: {n_rep} replicas, {conc} at a time, {threads} CPU thread(s) each, "
        + (f"{epochs} epochs (fixed)" if fixed else f"{calib_e} calibration epoch(s), then as many as fit")
        + (f"; training deadline at {deadline - run_start:,.0f}s" if deadline else ""))
    try:
        while pending or running:
            now = time.monotonic()
            if deadline is not None and now > deadline:
                log(f"train: DEADLINE reached: stopping {len(running)} running replica(s) (their last finished "
                    f"epoch is kept), {len(pending)} not started")
                for w in running.values():
                    w.stop()
                    w.status, w.ended = "stopped at the deadline", time.monotonic()
                finished.update(running)
                running.clear()
                for i in pending:
                    finished[i] = None
                pending.clear()
                break
            while pending and len(running) < conc and (epochs is not None or len(wave1) < conc):
                i = pending.pop(0)
                rc = replica_config(cfg, i, work / "ckpt" / f"replica-{i}", args.log_every)
                spec = {"config": rc, "epochs": epochs, "calib_epochs": calib_e, "threads": threads}
                running[i] = Worker(i, rc["strategy"], spec, work, logs, env, log)
                if epochs is None:
                    wave1.append(running[i])
                log(f"train: replica {i} ({rc['strategy']}, seed {rc['seed']}) started")
            for i, w in list(running.items()):
                if w.proc.poll() is not None:
                    w.thread.join(5)
                    w.ended = time.monotonic()
                    w.status = "done" if w.proc.returncode == 0 and w.result else f"failed (exit {w.proc.returncode})"
                    if w.status != "done":
                        log(f"train: replica {i} {w.status}; last lines of {w.log_path}:\n    "
                            + "\n    ".join(list(w.tail)[-12:]))
                    else:
                        log(f"train: replica {i} done in {time.monotonic() - w.started:,.0f}s")
                    finished[i] = running.pop(i)
            if epochs is None and len(wave1) == conc and all(w.calib or w.proc.poll() is not None for w in wave1):
                calib = [w.calib for w in wave1 if w.calib]
                plan = fit_epochs(args.budget_s, time.monotonic() - run_start, eval_s, reserve_s, calib, n_rep, conc,
                                  calib_e, args.max_epochs)
                epochs = plan["epochs"]
                results["budget"]["plan"] = plan
                log(f"train: measured {plan['epoch_s']:,.1f}s per epoch ({conc} concurrent), overhead "
                    f"{plan['overhead_s']:,.1f}s, start-up {plan['startup_s']:,.1f}s -> {epochs} epochs "
                    f"(cap {args.max_epochs}); training predicted to end at "
                    f"{plan['predicted_end_s'] - eval_s - reserve_s:,.0f}s, evaluation by {plan['predicted_end_s']:,.0f}s "
                    f"of the {args.budget_s:,.0f}s budget" + ("" if plan["fits"] else " (DOES NOT FIT: the deadline "
                                                              "will cut training)"))
                for w in wave1:
                    if w.proc.poll() is None:
                        w.tell(f"EPOCHS {epochs}")
            if time.monotonic() - last >= 15 and (running or pending):
                last = time.monotonic()
                done_ep = sum(w.epochs_done for w in [*running.values(), *filter(None, finished.values())])
                total_ep = n_rep * (epochs or calib_e)
                rate = done_ep / max(last - t0, 1e-9)
                eta = f"eta {(total_ep - done_ep) / rate:,.0f}s" if done_ep and epochs else "eta after the first epochs"
                log(f"train: {len(finished)}/{n_rep} replicas finished, running {sorted(running)} | "
                    f"{done_ep}/{total_ep} replica-epochs | {eta}")
            time.sleep(0.3)
    finally:
        for w in running.values():  # an exception here: leave no replica process behind
            w.stop()
    results["timings"]["train_s"] = time.monotonic() - t0
    results["recipe"]["epochs"] = epochs if epochs is not None else calib_e  # None: stopped before the plan
    for i in range(n_rep):
        w = finished.get(i)
        r = {"replica": i, "strategy": strategy_for_replica(i, cfg.data.input_size).name,
             "status": w.status if w else "not started",
             "epochs_planned": epochs, "log": f"logs/replica-{i}.log" if w else None}
        if w:
            r |= {**(w.result or {}), "wall_s": (w.ended or time.monotonic()) - w.started, "calibration": w.calib}
        results["replicas"].append(r)


def collect(cfg, work: Path, results: dict) -> list:
    """Each trained replica's last checkpoint -> the evaluation job's `Replica` (Polyak weights)."""
    from pipeline.data.sampling import strategy_for_replica
    from pipeline.evaluate.run import Replica
    from pipeline.train.loop import CHECKPOINT_FILE, load_checkpoint

    reps = []
    for r in results["replicas"]:
        path = work / "ckpt" / f"replica-{r['replica']}" / CHECKPOINT_FILE
        if not path.is_file():
            r["epochs_done"] = 0
            continue
        state = load_checkpoint(path)
        hist = state["history"]
        r["epochs_done"], r["history"] = state["epoch"], hist
        strategy = strategy_for_replica(r["replica"], cfg.data.input_size).name
        reps.append(Replica(r["replica"], strategy, f"local:{path}", cfg.model.variant, cfg.data.input_size,
                            state["num_classes"], hist[-1].get("val/top1_err", float("inf")) if hist else float("inf"),
                            state["ema"]["state"]))
    return reps


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: replicas.py SPEC.json (started by benchmarks/gpu/accuracy.py)")
    rc = worker(sys.argv[1])
    sys.stdout.flush()
    # Skip the interpreter's teardown (DALI pipelines, CUDA context: seconds each, time the next replica
    # could use): the checkpoint is on disk and the output flushed; the OS reclaims the rest.
    os._exit(rc)
