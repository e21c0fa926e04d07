"""One driver per ensemble on a Ray cluster.

Two drivers on one ensemble (a second `make demo` or `ray job submit` while the first still runs) would
train the same replicas into the same checkpoint folders and MLflow runs. A driver therefore holds a
named Ray actor, `ensemble-driver:<name>` in the `inception-pipeline` namespace, for as long as it
trains: creating a named actor is atomic in Ray's control store, so of two drivers starting at once
exactly one gets it. The actor is the driver's own (not detached): when the driver ends, however it
ends (done, stopped, SIGKILL, its node lost), Ray removes the actor with the driver's job, and the
next submission of the same command gets the lock and resumes. A driver that finds the lock held by
a job Ray still counts as running is refused, naming that job; a lock whose job has ended but that
Ray has not removed yet (a few seconds after a kill) is waited for. The lock actor lives on the
driver's own node, so that no other node's loss can free it while the driver trains.

The lock is the Ray cluster's: two drivers of one ensemble on two different Ray clusters (e.g. two plain
`python jobs/train_ensemble.py` runs that each start a local Ray) are not stopped by it.
"""

from __future__ import annotations

import os
import socket
import time

NAMESPACE = "inception-pipeline"
RELEASE_WAIT_S = 60  # how long a lock left by an ended job is waited for before giving up


class EnsembleBusy(Exception):
    """Another driver, still running, trains this ensemble."""


def lock_name(ensemble: str) -> str:
    return f"ensemble-driver:{ensemble}"


def _holder() -> dict:
    import ray

    ctx = ray.get_runtime_context()
    return {"job_id": ctx.get_job_id(), "submission_id": os.environ.get("RAY_JOB_SUBMISSION_ID") or None,
            "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}


def _lock_actor():
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class DriverLock:
        def __init__(self, holder: dict):
            self.holder = holder

        def who(self) -> dict:
            return self.holder

    return DriverLock


def _job_running(job_id: str) -> bool:
    """Whether Ray still counts the job as running (its driver alive). Unknown jobs count as running:
    refusing is the safe answer."""
    from ray._private import state

    for job in state.jobs():
        if job.get("JobID") == job_id:
            return not job.get("IsDead", False)
    return True


def describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    job = holder.get("submission_id") or holder.get("job_id")
    how = f"`ray job stop {holder['submission_id']}`" if holder.get("submission_id") else \
        f"stop process {holder.get('pid')} on {holder.get('host')}"
    return f"Ray job {job} (driver pid {holder.get('pid')} on {holder.get('host')}, since {since}); {how}"


def held_by(ensemble: str) -> dict | None:
    """Who holds the ensemble's lock now (a running job), or None: for a dry run, which takes nothing."""
    import ray

    try:
        actor = ray.get_actor(lock_name(ensemble), namespace=NAMESPACE)
        holder = ray.get(actor.who.remote(), timeout=30)
    except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None
    return holder if _job_running(holder["job_id"]) else None


def acquire(ensemble: str, log=print):
    """Take the ensemble's lock for this driver; returns the handle to `release`. Raises EnsembleBusy,
    naming the other driver and how to stop it, when a running job holds it."""
    import ray

    me = _holder()
    deadline, said = time.monotonic() + RELEASE_WAIT_S, False
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    while True:
        try:
            actor = _lock_actor().options(name=lock_name(ensemble), namespace=NAMESPACE,
                                          scheduling_strategy=here).remote(me)
            if ray.get(actor.who.remote(), timeout=120)["job_id"] == me["job_id"]:
                return actor
        except ValueError:  # the name is taken: by whom?
            pass
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:  # ours did not start
            if time.monotonic() >= deadline:
                raise EnsembleBusy(f"ensemble '{ensemble}': the driver's lock could not be started in Ray "
                                   f"({type(e).__name__}); submit again") from None
            time.sleep(1.0)
            continue
        try:
            other = ray.get_actor(lock_name(ensemble), namespace=NAMESPACE)
            holder = ray.get(other.who.remote(), timeout=30)
        except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            holder = None  # removed (or being removed) with its ended job: try again
        if holder is not None and holder["job_id"] == me["job_id"] and holder["pid"] == me["pid"]:
            raise EnsembleBusy(f"ensemble '{ensemble}' is already being trained by this process")
        if holder is not None and _job_running(holder["job_id"]):
            raise EnsembleBusy(f"ensemble '{ensemble}' is being trained by another driver: {describe(holder)}. "
                               "One driver per ensemble: wait for it to end, or stop it and submit again to resume "
                               "from its checkpoints")
        if time.monotonic() >= deadline:
            raise EnsembleBusy(f"ensemble '{ensemble}': the lock of an ended driver "
                               f"({describe(holder) if holder else 'unknown'}) was not released by Ray within "
                               f"{RELEASE_WAIT_S} s; submit again in a minute")
        if not said:
            log(f"ensemble {ensemble}: waiting for Ray to release the lock of an ended driver")
            said = True
        time.sleep(1.0)


def release(actor, ensemble: str) -> None:
    """Give the lock back (the driver's end would too; this frees it at once for a driver in the same process)."""
    import contextlib

    import ray

    with contextlib.suppress(Exception):
        ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # (the name is free once Ray has removed the actor)
        try:
            ray.get_actor(lock_name(ensemble), namespace=NAMESPACE)
        except Exception:
            return
        time.sleep(0.2)
