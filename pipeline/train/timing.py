"""Where a replica's training step time goes, per epoch: waiting for the next batch (the input pipeline
and the copy to the device), forward + backward, the optimizer, the Polyak average, and the rest (the
loop's own bookkeeping, progress lines, step metrics); the epoch's checkpoint separately.

On a GPU, kernels run asynchronously and a host clock would charge their time to whatever call happens
to wait for them: there, the split is measured on every `sample_every`-th step, with a synchronisation
before each mark; the other steps run unsynchronised and unmeasured. On a CPU every step is measured.
"""

from __future__ import annotations

import time

PHASES = ("data_wait", "forward_backward", "optimizer", "polyak", "other")
INPUT_BOUND = 0.10  # waiting for data above this fraction of step time: the replica is input-bound


class StepTimes:
    def __init__(self, cuda: bool = False, sample_every: int = 10):
        self.cuda, self.every = cuda, (sample_every if cuda else 1)
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.step, self._t = 0, None

    def _sampled(self, step: int) -> bool:
        return step % self.every == 0

    def _now(self, sync: bool) -> float:
        if sync and self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        """Before the epoch's first batch is asked for."""
        self.step = 0
        self._t = self._now(self._sampled(0))

    def lap(self, phase: str) -> None:
        """The time since the last mark belongs to `phase` (counted on sampled steps)."""
        sampled = self._sampled(self.step)
        now = self._now(sampled)
        if sampled and self._t is not None:
            self.totals[phase] += now - self._t
        self._t = now

    def end_step(self) -> None:
        """After a step's bookkeeping: that time is `other`; the next lap starts the wait for data."""
        self.lap("other")
        self.step += 1
        if self._sampled(self.step) and not self._sampled(self.step - 1):
            self._t = self._now(True)  # (a sampled step starts from a synchronised mark)

    def fractions(self) -> dict[str, float]:
        """Each phase's share of the measured step time, as MLflow metrics `time/<phase>_frac`."""
        total = sum(self.totals.values())
        return {f"time/{p}_frac": (v / total if total > 0 else 0.0) for p, v in self.totals.items()}


def input_bound_advice(replica: int, strategy: str, wait_frac: float | None, threads: int | None = None) -> str | None:
    """One line for the driver's summary when a replica waited for its data more than INPUT_BOUND of its
    step time, with what to change; None otherwise."""
    if wait_frac is None or wait_frac <= INPUT_BOUND:
        return None
    return (f"replica {replica} ({strategy}) is input-bound: it waited for its next batch {wait_frac:.0%} of its step "
            f"time{f' with {threads} CPU thread(s)' if threads else ''}. Give each replica more CPUs "
            "(ensemble.cpus_per_worker; DALI's threads follow them, or set data.num_threads), run DALI on the GPU "
            "(data.device=gpu with GPU workers), or train fewer replicas at once (ensemble.max_concurrent)")


class StepProfiler:
    """A torch profiler trace of `steps` training steps of rank 0 (after one step to skip and one to warm
    up), logged as the replica run's artifacts `profile/trace.json` (open it in Perfetto or
    chrome://tracing) and `profile/ops.txt` (the operators by total time)."""

    def __init__(self, steps: int, cuda: bool, logger, label: str):
        from torch.profiler import ProfilerActivity, profile, schedule

        self.logger, self.label, self.steps, self.left = logger, label, steps, steps + 2
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.prof = profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=steps, repeat=1),
                            on_trace_ready=self._log, record_shapes=True)
        self.prof.start()

    def _log(self, prof) -> None:
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            trace, ops = Path(tmp) / "trace.json", Path(tmp) / "ops.txt"
            prof.export_chrome_trace(str(trace))
            ops.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
            self.logger.artifact(str(trace), "profile")
            self.logger.artifact(str(ops), "profile")
        print(f"{self.label}: profiler trace of {self.steps} step(s) logged: artifacts profile/trace.json, "
              "profile/ops.txt", flush=True)

    def step(self) -> bool:
        """After each training step; True once the trace is written and logged."""
        self.prof.step()
        self.left -= 1
        if self.left > 0:
            return False
        self.prof.stop()
        return True
