"""Where the shard job writes a split, behind one small interface: a folder (`local`) or object storage
(`s3`). Each backend module provides

    guard(plans)                  context: one writer per split (flock / writer lease)
    prepare_output(plan, cfg)     refuse output made with other settings, clean up, record the job
    write_shard(source, split_dir, dataset, split, index, items, max_side, full_decode, job, owner)
                                  one Ray task: verify or write one shard, return its part record
    write_manifest(plan, text)    the split's manifest, last

`objstore` is the s3:// primitives (pyarrow.fs) also used by training's checkpoints; `lease` the writer
lease on object storage.
"""


def backend(location: str):
    """The backend module for an output location: `s3` for s3:// URIs, else `local`."""
    from pipeline.shards.storage import local, objstore, s3

    return s3 if objstore.is_uri(location) else local
