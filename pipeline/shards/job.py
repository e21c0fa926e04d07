"""The shard job: a raw dataset -> WebDataset shards, one Ray task per shard.

The driver lists every split first (so a bad root or an empty dataset fails before anything is
written), computes the sample -> shard assignment from a seeded shuffle (`pipeline.shards.plan`),
takes the split's writer guard and prepares its output through the storage backend (a folder or
s3://, `pipeline.shards.storage`), and submits one task per shard. Each task first checks whether its
shard is already complete (resume after a crash) and otherwise writes it; the split's manifest is
written last, from the parts.
"""

from __future__ import annotations

import sys
import time

from pipeline.config import ShardConfig
from pipeline.shards import storage
from pipeline.shards.format import MANIFEST, dump_json
from pipeline.shards.plan import ShardJobError, SplitPlan, build_manifest, plan_splits
from pipeline.shards.sources import open_source
from pipeline.shards.storage.objstore import join
from pipeline.tracking import log_shard_run, require_server, resolve_uri


def _init_ray():
    import ray

    if not ray.is_initialized():
        # No address: inside `ray job submit` (RAY_ADDRESS set) this joins the cluster; otherwise it
        # joins a running local cluster or starts one for the duration of this process.
        ray.init(log_to_driver=True, configure_logging=False)
    return ray


def run(cfg: ShardConfig, log=print) -> dict[str, dict]:
    """Run the shard job; returns {split: manifest}. Raises SourceError/ShardJobError/ConfigError."""
    cfg.validate()
    mlflow_uri = resolve_uri(cfg.mlflow_uri)
    if mlflow_uri:
        require_server(mlflow_uri)
    source = open_source(cfg.source, cfg.root, cfg.val_labels, cfg.max_file_mb, cfg.max_megapixels,
                         cfg.scene_settings())
    plans = plan_splits(cfg, source)  # all listing before anything is written
    store = storage.backend(cfg.out)
    with store.guard(plans):  # before --overwrite deletes anything: another live writer is never overridden
        for plan in plans:
            store.prepare_output(plan, cfg)
        return _run(cfg, source, plans, store, mlflow_uri, log)


def _settle(ray, pending: dict) -> None:
    """Stop the other running tasks and collect their results (errors included), so that no failure
    is left for Ray to print as an unhandled error after the job's own one-line error."""
    for ref in pending:
        ray.cancel(ref)
    for ref in pending:
        try:
            ray.get(ref, timeout=60)
        except Exception:
            pass


def os_error_advice(e: OSError) -> str:
    """What to do after a write failed, by its cause."""
    import errno

    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "make room (or choose another --out) and run the same command again"
    return "run the same command again once the cause is fixed"


def _os_error(e: OSError) -> str:
    """An OSError in one line: what failed, on which file."""
    what = e.strerror or str(e) or type(e).__name__
    return f"{what} ({e.filename})" if e.filename else what


def _shown(text: str) -> str:
    """Text for the log: a file name that is not UTF-8 shows its odd bytes as \\udcXX escapes (printing
    the surrogates Python holds them as would fail on a UTF-8 stream)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _run(cfg: ShardConfig, source, plans: list[SplitPlan], store, mlflow_uri, log) -> dict[str, dict]:
    ray = _init_ray()
    remote_write = ray.remote(num_cpus=1, max_retries=2)(store.write_shard)
    workers = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    source_ref = ray.put(source)
    todo = [(p, i, items) for p in plans for i, items in enumerate(p.shards)]
    total_shards, total_inputs = len(todo), sum(len(t[2]) for t in todo)
    log(f"shard job: {cfg.source} -> {join(cfg.out, cfg.dataset)} | splits {','.join(cfg.splits)} | "
        f"{total_inputs} images in {total_shards} shards | {workers} workers | seed {cfg.seed}")
    results: dict[str, list[dict]] = {p.split: [] for p in plans}
    pending: dict = {}
    t0 = time.perf_counter()
    done_shards = done_inputs = written_inputs = 0
    while todo or pending:
        while todo and len(pending) < workers:
            plan, i, items = todo.pop(0)
            ref = remote_write.remote(source_ref, str(plan.dir), cfg.dataset, plan.split, i, items,
                                      cfg.max_side, cfg.full_decode, plan.job, plan.owner)
            pending[ref] = plan.split
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            split = pending.pop(ref)
            try:
                part = ray.get(ref)
            except ShardJobError as e:  # a task refused to commit (lost lease), storage refused: its message
                _settle(ray, pending)
                raise ShardJobError(str(getattr(e, "cause", None) or e)) from None
            except OSError as e:  # the task could not write (a full disk, a quota, permissions, storage errors)
                _settle(ray, pending)
                cause = getattr(e, "cause", None) or e
                raise ShardJobError(f"writing a shard of {split} failed: {_os_error(cause)}; finished shards are "
                                    f"kept: {os_error_advice(cause)}") from None
            results[split].append(part)
            done_shards += 1
            done_inputs += part["inputs"]
            written_inputs += part["inputs"] if part["status"] == "written" else 0
            elapsed = time.perf_counter() - t0
            rate = written_inputs / elapsed if elapsed > 0 else 0.0
            eta = (total_inputs - done_inputs) / rate if rate > 0 else 0.0
            log(f"[{split}] shard {part['shard']:>4} {part['status']:<8} {part['num_samples']:>6} samples "
                f"{len(part['skipped'])} skipped | {done_shards}/{total_shards} shards | "
                f"{rate:,.0f} img/s | eta {eta:,.0f}s")
    nodes = {p.get("node") for parts in results.values() for p in parts} - {None}
    log(f"shards written by tasks on {len(nodes)} Ray node(s)")
    manifests = {}
    for plan in plans:
        manifest = build_manifest(plan, results[plan.split], cfg, source)
        store.write_manifest(plan, dump_json(manifest))  # last: marks the split complete
        manifests[plan.split] = manifest
    elapsed = time.perf_counter() - t0
    log(f"done in {elapsed:,.1f}s ({written_inputs / max(elapsed, 1e-9):,.0f} img/s written)")
    for plan in plans:
        m = manifests[plan.split]
        log(f"  {plan.split:<6} {m['num_samples']:>8} samples  {len(m['shards']):>4} shards  "
            f"{len(m['skipped'])} skipped  {len(m['repaired'])} repaired  "
            f"{sum(s['bytes'] for s in m['shards']) / 1e6:,.1f} MB  -> {plan.dir}")
        for w in m["warnings"][:5]:
            log(f"    warning: {_shown(w)}")
        for s in m["skipped"][:5]:
            log(f"    skipped: {_shown(s['source'])}: {_shown(s['reason'])}")
        if len(m["skipped"]) > 5:
            log(f"    ... {len(m['skipped']) - 5} more skipped, listed in {join(str(plan.dir), MANIFEST)}")
    if mlflow_uri:
        run_id = log_shard_run(mlflow_uri, cfg.experiment, cfg, manifests, elapsed, written_inputs)
        log(f"MLflow: shard run {run_id} at {mlflow_uri}")
    else:
        log("MLflow: not logged (set MLFLOW_TRACKING_URI or --mlflow-uri)")
    sys.stdout.flush()
    return manifests
