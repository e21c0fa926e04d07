"""The shard job's plan and records, shared by both storage backends: which inputs go to which shard
(a seeded shuffle), the job's fingerprint and the digest every part record carries, the refusal of
output made with other settings, and the manifest built from the parts."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from pipeline import __version__
from pipeline.config import FINGERPRINT_DEFAULTS, ShardConfig
from pipeline.shards.format import FORMAT, MANIFEST, PENDING_FORMAT, dump_json
from pipeline.shards.sources import Item, Listing, SourceError
from pipeline.shards.storage.objstore import is_uri, join


class ShardJobError(Exception):
    """The job refuses to run (e.g. existing output made with other settings, or another job writing)."""


@dataclass
class SplitPlan:
    split: str
    dir: Path | str  # a path, or for object storage the split's URI
    listing: Listing
    shards: list[list[Item]]
    fingerprint: dict
    owner: str | None = None  # object storage: the token of this job's writer lease on the split
    seen_manifest: str | None = None  # object storage: the manifest's ETag when the job prepared the split ("": none)

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


def job_digest(fingerprint: dict) -> str:
    """A short digest of a split's job fingerprint (settings, source, input listing), stored in every part
    record: a part written by a job with other settings is never taken as this job's shard."""
    return hashlib.sha256(dump_json(fingerprint).encode()).hexdigest()[:24]


def part_matches(part, job: str) -> bool:
    return isinstance(part, dict) and part.get("job") == job and isinstance(part.get("num_samples"), int)


def verified_part(text: str | None, job: str, size, sha256) -> dict | None:
    """A finished shard's part record (`text`) if this job's settings wrote it (`job`) and its tar and index
    still match it (`size(name)` -> bytes or None if missing, `sha256(name)`: the storage's view), else None.
    A record without the index's digest (written before it was recorded) is not taken: the shard is
    written again, the same bytes."""
    if text is None:
        return None
    try:
        part = json.loads(text)
    except ValueError:
        return None
    if not part_matches(part, job):
        return None
    if part["num_samples"] == 0:
        return part
    if not isinstance(part.get("index_sha256"), str):
        return None
    if size(part["name"]) != part["bytes"] or size(part["index"]) != part.get("index_bytes"):
        return None
    if sha256(part["index"]) != part["index_sha256"] or sha256(part["name"]) != part["sha256"]:
        return None
    return part


def node_id() -> str | None:
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


def fingerprint(cfg: ShardConfig, source, split: str, num_shards: int, listing: Listing) -> dict:
    lines = input_lines(listing)
    digest = hashlib.sha256("".join(ln + "\n" for ln in lines).encode("utf-8", "surrogateescape")).hexdigest()
    return {"dataset": cfg.dataset, "split": split, **cfg.fingerprint(), "source_info": source.describe(),
            "num_shards": num_shards, "inputs": {"count": len(lines), "sha256": digest}}


def listing_change(parts: Path, now: list[str]) -> str:
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


def refuse_other_settings(where: str, recorded: dict | None, plan: SplitPlan, inputs_before: Path) -> None:
    """Raise ShardJobError if `where` records a job (`recorded`: its manifest's or .parts/job.json's
    fingerprint) other than this plan's; `inputs_before` is the folder holding that job's inputs.txt."""
    fp = plan.fingerprint
    if recorded is None or recorded == fp:
        return
    changed = [k for k in sorted(set(fp) | set(recorded)) if recorded.get(k) != fp.get(k)]
    if changed == ["inputs"]:
        raise ShardJobError(f"{where}: {listing_change(inputs_before, input_lines(plan.listing))}; resuming would mix "
                            "two listings (samples stored twice or never), so it is refused: pass --overwrite "
                            "to rewrite the split from the current inputs")
    shown = lambda d, k: d.get(k, FINGERPRINT_DEFAULTS.get(k))  # noqa: E731  (a cap left out is its default)

    def diffs(k: str) -> list[str]:  # a changed dict (source_info) names the entries that changed
        a, b = shown(recorded, k), shown(fp, k)
        if isinstance(a, dict) and isinstance(b, dict):
            return [f"{k}.{s}={a.get(s)!r} (now {b.get(s)!r})" for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)]
        return [f"{k}={a!r} (now {b!r})"]

    diff = ", ".join(d for k in changed for d in diffs(k))
    raise ShardJobError(f"{where} holds shards made with other settings: {diff}; "
                        "pass --overwrite to replace them or choose another --out")


def prepare_split(plan: SplitPlan, cfg: ShardConfig, out) -> None:
    """Both backends' `prepare_output`: with --overwrite remove the split's records and shards (the
    manifest first; on s3:// the manifest becomes the job's placeholder and the shards the new manifest
    does not list are removed after it lands); refuse output made with other settings or shards nobody
    recorded; clean up what a killed run left; record this job's input listing, then its fingerprint
    (last: the record a rerun is checked against). `out` is the backend's view of the split:
    `remove_all()` (manifest first), `read(name)` and `read_part(name)` (bytes or None), `has_tars()`,
    `clean_temporaries()`, `write_part(name, data)`."""
    import tempfile

    fp = plan.fingerprint
    if cfg.overwrite:
        out.remove_all()
    recorded = None
    text = out.read(MANIFEST)
    manifest = json.loads(text) if text is not None else None
    if manifest is not None and manifest.get("format") != PENDING_FORMAT:  # (a placeholder: not finished)
        recorded = manifest.get("job")
    elif (text := out.read_part("job.json")) is not None:
        recorded = json.loads(text)
    if recorded is not None and recorded != fp:
        with tempfile.TemporaryDirectory() as tmp:
            if (inputs := out.read_part(INPUTS_FILE)) is not None:
                Path(tmp, INPUTS_FILE).write_bytes(inputs)
            refuse_other_settings(str(plan.dir), recorded, plan, Path(tmp))
    if recorded is None and not cfg.overwrite and out.has_tars():
        raise ShardJobError(f"{plan.dir} holds shards this job did not record (no manifest, no .parts/job.json); "
                            "pass --overwrite to replace them")
    out.clean_temporaries()
    lines = input_lines(plan.listing)  # file names that are not UTF-8 are stored as their original bytes
    out.write_part(INPUTS_FILE, "".join(ln + "\n" for ln in lines).encode("utf-8", "surrogateescape"))
    out.write_part("job.json", dump_json(fp).encode())


def build_manifest(plan: SplitPlan, parts: list[dict], cfg: ShardConfig, source) -> dict:
    parts = sorted(parts, key=lambda p: p["shard"])
    foreign = [p["shard"] for p in parts if p.get("job") != plan.job]
    if foreign:  # an internal invariant: write_shard only returns this job's parts
        raise RuntimeError(f"{plan.split}: parts {foreign} were not written with this job's settings")
    shards = [{"name": p["name"], "index": p["index"], "num_samples": p["num_samples"],
               "bytes": p["bytes"], "sha256": p["sha256"], "index_bytes": p["index_bytes"],
               "index_sha256": p["index_sha256"]} for p in parts if p["num_samples"]]
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
        plans.append(SplitPlan(split, d, listing, shards, fingerprint(cfg, source, split, len(shards), listing)))
    return plans
