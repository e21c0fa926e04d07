"""Read a split straight from object storage with DALI's webdataset reader (no local copy) and print
{"keys": [...], "labels": [...]} as JSON. Run as its own process by tests/test_s3.py: DALI creates its
S3 client once per process, from the environment it finds then.

    python tests/s3_dali_read.py s3://bucket/prefix/split   (AWS_ENDPOINT_URL etc. in the environment)
"""

import json
import sys

from nvidia.dali import fn, pipeline_def, types

from pipeline.shards.format import MANIFEST
from pipeline.shards.storage import objstore


def main(uri: str) -> None:
    manifest = json.loads(objstore.read_text(objstore.join(uri, MANIFEST)))
    tars = [objstore.join(uri, s["name"]) for s in manifest["shards"]]
    idx = [objstore.join(uri, s["index"]) for s in manifest["shards"]]  # index files read from S3 as well

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        jpg, lbl, meta = fn.readers.webdataset(paths=tars, index_paths=idx, ext=["jpg", "lbl", "json"],
                                               dtypes=[types.UINT8, types.INT32, types.UINT8], name="Reader")
        image = fn.decoders.image(jpg, device="cpu", output_type=types.RGB)  # bytes arrive whole: they decode
        return fn.shapes(image), lbl, meta

    p = pipe()
    p.build()
    n = p.epoch_size("Reader")
    keys, labels = [], []
    for _ in range(n):
        shape, lbl, meta = p.run()
        labels.append(int(lbl.at(0)[0]))
        keys.append(json.loads(bytes(meta.at(0)).decode())["source"])
    print(json.dumps({"keys": keys, "labels": labels, "epoch_size": n}))


if __name__ == "__main__":
    main(sys.argv[1])
