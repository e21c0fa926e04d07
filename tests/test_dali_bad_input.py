"""Bad input reaching the DALI loaders: corrupt images inside shards, missing index files or manifest."""

import pytest
from conftest import jpeg_bytes, write_test_split

from pipeline.data.dali_eval import DALIEvalLoader
from pipeline.data.dali_train import DALITrainLoader, TrainPipelineConfig
from pipeline.data.sampling import get_strategy
from pipeline.shards.format import MANIFEST, ShardError

CORRUPT = b"\xff\xd8" + b"not really a jpeg" * 30 + b"\xff\xd9"  # passes a header/EOI glance, not a decode


@pytest.fixture
def split_with_corrupt_image(tmp_path):
    images = [jpeg_bytes(seed=i, size=(40, 30)) for i in range(30)]
    images[13] = CORRUPT
    return write_test_split(tmp_path / "train", images, list(range(30)), per_shard=10)


def test_train_loader_skips_a_corrupt_image_with_a_warning(split_with_corrupt_image, tmp_path):
    seen = []
    with pytest.warns(UserWarning, match=r"skipping corrupt image test-split-000001.tar:s000013"):
        # (the first batches are read while the loader is built, so the warning may come from here)
        ld = DALITrainLoader(split_with_corrupt_image,
                             TrainPipelineConfig(get_strategy("inception", 32), batch_size=5, seed=1, device="cpu"),
                             quarantine_dir=str(tmp_path / "q"))
        for epoch in range(3):
            ld.set_epoch(epoch)
            for _, y in ld:
                seen += y.tolist()
    assert ld.skipped == ["test-split-000001.tar:s000013"]
    assert 13 not in seen and len(set(seen)) == 29  # every other sample still trains
    assert len(ld) == 29 // 5
    assert all(p.endswith(".idx") and "/q/" in p for p in ld.index_paths)


def test_eval_loader_skips_a_corrupt_image_and_keeps_the_rest_exactly_once(split_with_corrupt_image):
    ld = DALIEvalLoader(split_with_corrupt_image, n_crops=10, input_size=32, batch_size=4, device="cpu")
    labels = []
    with pytest.warns(UserWarning, match="s000013"):
        for _, y in ld:
            labels += y.tolist()
    assert sorted(labels) == [i for i in range(30) if i != 13]
    assert ld.skipped == ["test-split-000001.tar:s000013"] and len(ld.keys) == 29


def test_missing_index_file_or_manifest_is_reported(tmp_path):
    d = write_test_split(tmp_path / "val", [jpeg_bytes(seed=i) for i in range(6)], list(range(6)), per_shard=3)
    (d / "test-split-000001.idx").unlink()
    with pytest.raises(ShardError, match="test-split-000001.idx is missing"):
        DALIEvalLoader(d, device="cpu")
    (d / MANIFEST).unlink()
    with pytest.raises(ShardError, match="no manifest.json"):
        DALITrainLoader(d, TrainPipelineConfig(get_strategy("inception", 32), device="cpu"))
