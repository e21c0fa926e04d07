"""The shard job: a raw dataset -> WebDataset shards, one Ray task per shard.

The driver lists every split first (so a bad root or an empty dataset fails before anything is
written), computes the sample -> shard assignment from a seeded shuffle, and submits one task per
shard. Each task first checks whether its shard is already complete (resume after a crash) and
otherwise writes it: tar and index to temporary names, then its `.parts/<name>.json` result, then the
tar renamed into place. The split's manifest is written last, from the parts.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import __version__
from pipeline.config import ShardConfig
from pipeline.data.objstore import is_uri, join, write_bytes
from pipeline.data.shards import (
    FORMAT,
    MANIFEST,
    PARTS_DIR,
    ShardSample,
    atomic_write_text,
    dump_json,
    fsync_dir,
    sha256_file,
    shard_name,
    write_tar,
)
from pipeline.data.sources import Item, Listing, SkipSample, SourceError, error_reason, open_source
from pipeline.tracking import log_shard_run, require_server, resolve_uri


class ShardJobError(Exception):
    """The job refuses to run (e.g. existing output made with other settings)."""


@dataclass
class SplitPlan:
    split: str
    dir: Path | str  # a path, or for object storage the split's URI
    listing: Listing
    shards: list[list[Item]]
    fingerprint: dict
    lease: object = None  # object storage: this job's writer lease on the split (pipeline.data.lease)

    @property
    def job(self) -> str:
        return job_digest(self.fingerprint)


def assign_shards(items: list[Item], seed: int, per_shard: int, limit: int | None) -> list[list[Item]]:
    """Seeded shuffle of the listing (classes mixed in every shard), then consecutive chunks.

    `limit` keeps the first N of the shuffled order, so a demo subset still mixes all classes.
    """
    order = list(items)
    random.Random(seed).shuffle(order)
    if limit is not None:
        order = order[:limit]
    return [order[i:i + per_shard] for i in range(0, len(order), per_shard)]


def _part_path(split_dir: Path, name: str) -> Path:
    return split_dir / PARTS_DIR / f"{name}.json"


def job_digest(fingerprint: dict) -> str:
    """A short digest of a split's job fingerprint (settings, source, input listing), stored in every part
    record: a part written by a job with other settings is never taken as this job's shard."""
    return hashlib.sha256(dump_json(fingerprint).encode()).hexdigest()[:24]


def part_matches(part, job: str) -> bool:
    return isinstance(part, dict) and part.get("job") == job and isinstance(part.get("num_samples"), int)


def shard_is_complete(split_dir: Path, name: str, job: str) -> dict | None:
    """The recorded result of a finished shard if it was written by this job's settings (`job`, see
    job_digest) and its tar and index still match it, else None."""
    part_file = _part_path(split_dir, name)
    if not part_file.is_file():
        return None
    try:
        part = json.loads(part_file.read_text())
    except json.JSONDecodeError:
        return None
    if not part_matches(part, job):
        return None
    if part["num_samples"] == 0:
        return part
    tar, idx = split_dir / part["name"], split_dir / part["index"]
    if not (tar.is_file() and idx.is_file()) or tar.stat().st_size != part["bytes"]:
        return None
    if sha256_file(tar) != part["sha256"]:
        return None
    return part


def write_shard(source, split_dir: str, dataset: str, split: str, index: int, items: list[Item],
                max_side: int | None, full_decode: bool, job: str) -> dict:
    """Write (or verify) one shard. Never raises for one bad input: it is recorded as skipped."""
    d = Path(split_dir)
    name = shard_name(dataset, split, index)
    t0 = time.perf_counter()
    node = _node_id()
    done = shard_is_complete(d, name, job)
    if done is not None:
        return {**done, "status": "verified", "seconds": time.perf_counter() - t0, "node": node}
    skipped: list[dict] = []
    repaired: list[dict] = []

    def samples():
        for it in items:
            try:
                p = source.prepare(it, max_side=max_side, full_decode=full_decode)
            except SkipSample as e:
                skipped.append({"source": it.source, "reason": str(e)})
                continue
            except Exception as e:  # one odd file must not take the shard down
                skipped.append({"source": it.source, "reason": f"unexpected error: {error_reason(e)}"})
                continue
            if p.repaired:
                repaired.append({"source": it.source, "reason": p.repaired})
            meta = {"source": it.source, **{k: v for k, v in it.meta.items() if k != "index"},
                    "width": p.width, "height": p.height}
            yield ShardSample(it.key, it.label, p.jpg, meta)

    tmp_tar = d / f"{name}.tar.tmp-{os.getpid()}"
    n, size, digest, index_text = write_tar(tmp_tar, samples())
    part = {"shard": index, "job": job, "name": f"{name}.tar" if n else None, "index": f"{name}.idx" if n else None,
            "inputs": len(items), "num_samples": n, "bytes": size if n else 0, "sha256": digest if n else None,
            "skipped": skipped, "repaired": repaired}
    if n:
        atomic_write_text(d / f"{name}.idx", index_text)
    atomic_write_text(_part_path(d, name), dump_json(part))
    if n:
        os.replace(tmp_tar, d / f"{name}.tar")  # last: a tar under its final name is complete
        fsync_dir(d)
    else:
        tmp_tar.unlink()
    return {**part, "status": "written", "seconds": time.perf_counter() - t0, "node": node}


def _node_id() -> str | None:
    """The Ray node a task ran on (None outside Ray); reported, not stored in the shards."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


INPUTS_FILE = "inputs.txt"  # in .parts/: the listing a resumed run must match (names what changed)


def input_lines(listing: Listing) -> list[str]:
    """The split's inputs as sorted `source<TAB>label` lines (skipped ones with label -1): what a resumed
    run must find unchanged, or its shards would mix two listings (duplicated and lost samples)."""
    return sorted([f"{it.source}\t{it.label}" for it in listing.items] +
                  [f"{s['source']}\t-1" for s in listing.skipped])


def _fingerprint(cfg: ShardConfig, source, split: str, num_shards: int, listing: Listing) -> dict:
    lines = input_lines(listing)
    digest = hashlib.sha256("".join(ln + "\n" for ln in lines).encode("utf-8", "surrogateescape")).hexdigest()
    return {"dataset": cfg.dataset, "split": split, **cfg.fingerprint(), "source_info": source.describe(),
            "num_shards": num_shards, "inputs": {"count": len(lines), "sha256": digest}}


def _listing_change(parts: Path, now: list[str]) -> str:
    """What changed in the input listing since the run that recorded .parts/inputs.txt."""
    f = parts / INPUTS_FILE
    if not f.is_file():
        return "the input listing differs"
    before = f.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    gone, new = sorted(set(before) - set(now)), sorted(set(now) - set(before))

    def show(xs: list[str]) -> str:
        return ", ".join(x.replace("\t", " label ") for x in xs[:3]) + (" ..." if len(xs) > 3 else "")

    return (f"the input listing changed since that run: {len(gone)} input(s) gone" + (f" ({show(gone)})" if gone else "")
            + f", {len(new)} new" + (f" ({show(new)})" if new else ""))


def _owned_files(split_dir: Path, dataset: str, split: str) -> list[Path]:
    prefix = f"{dataset}-{split}-"
    return [p for p in split_dir.iterdir()
            if p.name == MANIFEST or (p.name.startswith(prefix) and (p.suffix in (".tar", ".idx") or ".tmp-" in p.name))]


def prepare_output(plan: SplitPlan, cfg: ShardConfig) -> None:
    """Refuse to mix with output made by other settings; clean temporaries; record the job."""
    d, fp = plan.dir, plan.fingerprint
    parts = d / PARTS_DIR
    if cfg.overwrite and d.exists():
        for p in _owned_files(d, cfg.dataset, plan.split):
            p.unlink()
        shutil.rmtree(parts, ignore_errors=True)
    recorded = None
    if (d / MANIFEST).is_file():
        recorded = json.loads((d / MANIFEST).read_text()).get("job")
    elif (parts / "job.json").is_file():
        recorded = json.loads((parts / "job.json").read_text())
    if recorded is not None and recorded != fp:
        changed = [k for k in sorted(set(fp) | set(recorded)) if recorded.get(k) != fp.get(k)]
        if changed == ["inputs"]:
            raise ShardJobError(f"{d}: {_listing_change(parts, input_lines(plan.listing))}; resuming would mix "
                                "two listings (samples stored twice or never), so it is refused: pass --overwrite "
                                "to rewrite the split from the current inputs")
        diff = ", ".join(f"{k}={recorded.get(k)!r} (now {fp.get(k)!r})" for k in changed)
        raise ShardJobError(f"{d} holds shards made with other settings: {diff}; "
                            "pass --overwrite to replace them or choose another --out")
    if recorded is None and d.exists() and any(p.suffix == ".tar" for p in _owned_files(d, cfg.dataset, plan.split)):
        raise ShardJobError(f"{d} holds shards this job did not record (no manifest, no .parts/job.json); "
                            "pass --overwrite to replace them")
    parts.mkdir(parents=True, exist_ok=True)
    for p in [*_owned_files(d, cfg.dataset, plan.split), *parts.iterdir()]:
        if ".tmp-" in p.name:
            p.unlink()  # left by a killed run (a tar, or a part record written with atomic_write_text)
    atomic_write_text(parts / INPUTS_FILE, "".join(ln + "\n" for ln in input_lines(plan.listing)))
    atomic_write_text(parts / "job.json", dump_json(fp))  # last: the record a rerun is checked against


def build_manifest(plan: SplitPlan, parts: list[dict], cfg: ShardConfig, source) -> dict:
    parts = sorted(parts, key=lambda p: p["shard"])
    foreign = [p["shard"] for p in parts if p.get("job") != plan.job]
    if foreign:  # an internal invariant: write_shard only returns this job's parts
        raise RuntimeError(f"{plan.split}: parts {foreign} were not written with this job's settings")
    shards = [{"name": p["name"], "index": p["index"], "num_samples": p["num_samples"],
               "bytes": p["bytes"], "sha256": p["sha256"]} for p in parts if p["num_samples"]]
    skipped = list(plan.listing.skipped) + [s for p in parts for s in p["skipped"]]
    repaired = [r for p in parts for r in p["repaired"]]
    num_samples = sum(p["num_samples"] for p in parts)
    inputs_seen = sum(p["inputs"] for p in parts) + len(plan.listing.skipped)
    if num_samples + len(skipped) != inputs_seen:  # an internal invariant, not input validation
        raise RuntimeError(f"{plan.split}: {num_samples} samples + {len(skipped)} skipped != {inputs_seen} inputs")
    return {
        "format": FORMAT,
        "dataset": cfg.dataset,
        "split": plan.split,
        "seed": cfg.seed,
        "tool": f"inception-pipeline {__version__}",
        "job": plan.fingerprint,
        "classes": plan.listing.classes,
        "class_names": plan.listing.class_names,
        "num_classes": len(plan.listing.classes),
        "num_samples": num_samples,
        "inputs_seen": inputs_seen,
        "components": {"jpg": "image, JPEG", "cls": "label, ASCII integer", "json": "metadata",
                       "lbl": "label, little-endian int32"},
        "shards": shards,
        "skipped": skipped,
        "repaired": repaired,
        "warnings": plan.listing.warnings,
    }


def plan_splits(cfg: ShardConfig, source) -> list[SplitPlan]:
    plans = []
    for split in cfg.splits:
        listing = source.list_split(split)
        if not listing.items:
            reasons = "; ".join(f"{s['source']}: {s['reason']}" for s in listing.skipped[:3])
            raise SourceError(f"split '{split}' has no usable images under {cfg.root}"
                              + (f" ({len(listing.skipped)} unusable, e.g. {reasons})" if reasons else ""))
        shards = assign_shards(listing.items, cfg.seed, cfg.samples_per_shard, cfg.limit)
        d = Path(cfg.out) / cfg.dataset / split if not is_uri(cfg.out) else join(cfg.out, cfg.dataset, split)
        plans.append(SplitPlan(split, d, listing, shards, _fingerprint(cfg, source, split, len(shards), listing)))
    return plans


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
    source = open_source(cfg.source, cfg.root, cfg.val_labels)
    plans = plan_splits(cfg, source)  # all listing before anything is written
    if is_uri(cfg.out):  # object storage: a writer lease per split instead of flock (pipeline.data.lease)
        from pipeline.data import s3shards
        from pipeline.data.lease import Lease, LeaseError

        try:
            try:
                for plan in plans:  # before --overwrite deletes anything: a live lease is never overridden
                    plan.lease = Lease(str(plan.dir), f"shard job {cfg.dataset}/{plan.split} seed {cfg.seed}")
                    plan.lease.acquire()
                    s3shards.prepare_output(plan, cfg)
                return _run(cfg, source, plans, mlflow_uri, log)
            finally:
                for plan in plans:
                    if plan.lease is not None:
                        plan.lease.release()
        except LeaseError as e:
            raise ShardJobError(str(e)) from None
    locks = []
    try:
        for plan in plans:
            plan.dir.mkdir(parents=True, exist_ok=True)
            locks.append(lock_split(plan.dir))
            prepare_output(plan, cfg)
        return _run(cfg, source, plans, mlflow_uri, log)
    finally:
        for fd in locks:
            os.close(fd)  # releases the lock


LOCK_FILE = ".shard-job.lock"


def lock_split(split_dir: Path) -> int:
    """An exclusive lock on the split folder for this job's lifetime: a second concurrent run on the same
    output would delete the first one's temporary files and interleave shards (flock: local
    filesystems and NFSv4; on others, one writer at a time is the user's rule)."""
    import fcntl

    fd = os.open(split_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ShardJobError(f"{split_dir} is being written by another shard job (lock {split_dir / LOCK_FILE} is "
                            "held); wait for it to finish or stop it") from None
    return fd


def _shown(text: str) -> str:
    """Text for the log: a file name that is not UTF-8 shows its odd bytes as \\udcXX escapes (printing
    the surrogates Python holds them as would fail on a UTF-8 stream)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _run(cfg: ShardConfig, source, plans: list[SplitPlan], mlflow_uri, log) -> dict[str, dict]:
    ray = _init_ray()
    if is_uri(cfg.out):
        from pipeline.data.s3shards import write_shard as write_fn
    else:
        write_fn = write_shard
    remote_write = ray.remote(num_cpus=1, max_retries=2)(write_fn)
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
            extra = (plan.lease.owner,) if plan.lease is not None else ()
            ref = remote_write.remote(source_ref, str(plan.dir), cfg.dataset, plan.split, i, items,
                                      cfg.max_side, cfg.full_decode, plan.job, *extra)
            pending[ref] = plan.split
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            split = pending.pop(ref)
            part = ray.get(ref)
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
        if plan.lease is not None:
            plan.lease.check()  # still ours: no other job can have touched the split meanwhile
        if is_uri(plan.dir):
            write_bytes(join(plan.dir, MANIFEST), dump_json(manifest).encode())  # last: marks the split complete
        else:
            atomic_write_text(plan.dir / MANIFEST, dump_json(manifest))  # last: marks the split complete
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
