"""trainer.prepare: image folders to TFRecord shards, and training from them."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

from tests import images
from tests.conftest import TINY_MODEL, error_line, run_module
from trainer import pipelines
from trainer import records
from trainer import sources

pytestmark = pytest.mark.slow  # every test here runs the CLI in a subprocess

JOB = [*TINY_MODEL, "--image_size=32", "--epochs=2",
       "--fine_tune_epochs=1", "--learning_rate=1e-2", "--batch_size=8"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    source = images.folder(str(root / "images"), per_class=12, size=80)
    images.save_corrupt(str(root / "images" / "train" / "red" / "cut.jpg"), "truncated")
    output = str(root / "records")
    process = run_module("trainer.prepare", f"--images={source}", f"--output={output}",
                         "--max_side=40", "--min_shards=4", "--validation_split=0.25")
    assert process.returncode == 0, process.stderr[-2000:]
    return source, output, process


def test_prepare_writes_shards_index_and_info(prepared):
    source, output, process = prepared
    with open(os.path.join(output, records.DATASET_INFO)) as handle:
        info = json.load(handle)
    assert info["class_names"] == ["green", "red"]
    assert info["splits"]["train"]["count"] == 18 and info["splits"]["validation"]["count"] == 6
    assert info["splits"]["train"]["per_class"] == {"green": 9, "red": 9}
    assert info["splits"]["train"]["shards"] == [f"train-{i:05d}-of-00004.tfrecord"
                                                 for i in range(4)]
    assert sum(info["splits"]["train"]["records_per_shard"]) == 18
    assert info["skipped"] == [{"path": os.path.join(source, "train", "red", "cut.jpg"),
                                "reason": "cannot be decoded"}]
    assert info["image_policy"]["max_side"] == 40
    assert "shard 4/4 written" in process.stdout
    # No TensorFlow start-up chatter: only the skipped image's warning.
    assert not re.search(r"oneDNN|absl::InitializeLog", process.stderr), process.stderr
    record = next(iter(tf.data.TFRecordDataset(os.path.join(output, info["splits"]["train"]
                                                             ["shards"][0]))))
    example = tf.io.parse_single_example(record, records.FEATURES)
    assert tf.io.decode_jpeg(example["image/encoded"]).shape == (40, 40, 3)  # was 80 x 80


def test_prepare_refuses_to_overwrite_without_the_flag(prepared, tmp_path):
    source, output, _ = prepared
    process = run_module("trainer.prepare", f"--images={source}", f"--output={output}")
    assert process.returncode == 2
    assert "already holds a prepared dataset" in error_line(process)


def test_prepare_again_after_a_stopped_one_removes_its_shards_only(prepared, tmp_path):
    source, _, _ = prepared
    output = tmp_path / "records"
    output.mkdir()
    for name in ("train-00003-of-00009.tfrecord", "train-index.json", "mine.tfrecord"):
        (output / name).write_bytes(b"left over")
    process = run_module("trainer.prepare", f"--images={source}", f"--output={output}",
                         "--min_shards=2", "--validation_split=0.25")
    assert process.returncode == 0, process.stderr[-2000:]
    assert "removed 2 file(s) of an earlier prepare" in process.stdout
    assert sorted(os.listdir(output)) == [
        "dataset_info.json", "labels.txt", "mine.tfrecord", "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord", "train-index.json", "validation-00000-of-00002.tfrecord",
        "validation-00001-of-00002.tfrecord", "validation-index.json"]
    assert len(sources.scan(str(output)).train) == 18


def test_prepare_skips_and_counts_what_it_cannot_take(tmp_path):
    source = images.folder(str(tmp_path / "images"), per_class=4, size=40)
    huge = images.save(str(tmp_path / "images" / "train" / "red" / "huge.png"), size=400,
                       kind="png")
    output = str(tmp_path / "records")
    process = run_module("trainer.prepare", f"--images={source}", f"--output={output}",
                         "--max_side=32", "--max_image_pixels=100000", "--min_shards=1")
    assert process.returncode == 0, process.stderr[-2000:]
    with open(os.path.join(output, records.DATASET_INFO)) as handle:
        info = json.load(handle)
    assert info["skipped"] == [{"path": huge,
                                "reason": "more than --max_image_pixels=100000 pixels"}]
    assert info["splits"]["train"]["count"] + info["splits"]["validation"]["count"] == 8


def test_training_from_prepared_shards(prepared, tmp_path):
    _, output, _ = prepared
    model_dir = str(tmp_path / "run")
    # No caching of features or decoded images: every epoch streams the shards.
    process = run_module("trainer.task", f"--data={output}", f"--model_dir={model_dir}", *JOB,
                         "--cache_features=off", "--memory_budget_mb=0")
    assert process.returncode == 0, process.stderr[-2000:]
    assert "from prepared TFRecords" in process.stdout
    with open(os.path.join(model_dir, "metrics.json")) as handle:
        metrics = json.load(handle)
    assert (metrics["train_images"], metrics["val_images"], metrics["skipped_images"]) == (18, 6, 1)
    assert sum(map(sum, metrics["confusion_matrix"])) == 6


def test_the_fingerprint_of_prepared_shards_follows_their_records(prepared, tmp_path):
    copy = str(tmp_path / "records")
    shutil.copytree(prepared[1], copy)
    before = sources.fingerprint(sources.scan(copy).train)
    assert sources.fingerprint(sources.scan(copy).train) == before
    with open(sources.scan(copy).train.shards[0], "ab") as handle:
        handle.write(b"\0")
    assert sources.fingerprint(sources.scan(copy).train) != before


def test_damaged_shard_is_a_one_line_error(prepared, tmp_path):
    _, output, _ = prepared
    damaged = str(tmp_path / "records")
    shutil.copytree(output, damaged)
    with open(os.path.join(damaged, "train-00001-of-00004.tfrecord"), "r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff" * 16)  # fails the record's CRC
    process = run_module("trainer.task", f"--data={damaged}",
                         f"--model_dir={tmp_path / 'run'}", *JOB)
    assert process.returncode == 2
    assert f"cannot read the data in --data={damaged}: corrupted record" in error_line(process)


def keys_read_by_two_pipelines(split, global_batch, deterministic):
    """The record keys each of two input pipelines reads in epoch 0 (also run on gs:// by
    test_gcs)."""
    return [[int(key) for _, _, keys, _ in pipelines.epoch_records(
        split, 0, 7, global_batch, tf.distribute.InputContext(2, index, 2), deterministic)
        for key in keys] for index in range(2)]


def weight_read_by_two_pipelines(split, global_batch):
    return sum(float(tf.reduce_sum(weights)) for index in range(2)
               for _, _, _, weights in pipelines.epoch_records(
                   split, 0, 7, global_batch, tf.distribute.InputContext(2, index, 2)))


@pytest.mark.parametrize("min_shards", [4, 1])  # by file, then by record
def test_two_pipelines_read_every_record_exactly_once_per_epoch(tmp_path, min_shards):
    source = images.folder(str(tmp_path / "images"), per_class=8, size=16)
    output = str(tmp_path / "records")
    process = run_module("trainer.prepare", f"--images={source}", f"--output={output}",
                         f"--min_shards={min_shards}", "--validation_split=0.5")
    assert process.returncode == 0, process.stderr[-2000:]
    split = sources.scan(output).train
    for deterministic in (True, False):
        for global_batch in (4, 6):  # 8 records: 2 whole batches; 2 batches with 4 of padding
            per_pipeline = keys_read_by_two_pipelines(split, global_batch, deterministic)
            assert [len(keys) for keys in per_pipeline] == [2 * global_batch // 2] * 2
            seen = per_pipeline[0] + per_pipeline[1]
            assert set(seen) == set(range(len(split)))
            assert len(seen) == len(set(seen)) or global_batch == 6
            # The padding has weight 0: the epoch weighs as many as the split has records.
            assert weight_read_by_two_pipelines(split, global_batch) == len(split)


def test_resumed_record_stream_continues_with_the_same_batches(prepared):
    _, output, _ = prepared
    split = sources.scan(output).train
    context = tf.distribute.InputContext()

    def batches(first_step):
        dataset = pipelines.training_pipeline(split, first_step, 9, 8, 16, 3, context)
        return [(images.numpy(), labels.numpy()) for images, labels, _ in dataset]

    whole, resumed = batches(0), batches(4)
    assert len(whole) == 9 and len(resumed) == 5
    for (images_a, labels_a), (images_b, labels_b) in zip(whole[4:], resumed):
        np.testing.assert_array_equal(labels_a, labels_b)
        np.testing.assert_allclose(images_a, images_b)


def test_no_pipeline_autotunes(prepared):
    """tf.data's autotuning thread can hold up the freeing of an iterator for up to a minute
    on a busy machine (pipelines._untuned): every pipeline a job iterates has it off, over
    image files and over records."""
    source, output, _ = prepared
    context = tf.distribute.InputContext()
    datasets = [pipelines.array_pipeline([np.zeros((8, 2), np.float32)], np.zeros(8, np.int32),
                                         *pipelines.evaluation_order(8, 4), 4, context)]
    for split in (sources.scan(source).train, sources.scan(output).train):
        rows = np.arange(len(split))
        datasets += [pipelines.pipeline(split, *pipelines.evaluation_order(len(split), 4), 4, 16,
                                        context),
                     pipelines.image_pass(split, rows, 4, 16, 10**8, context),
                     pipelines.training_pipeline(split, 0, 3, 4, 16, 0, context)]
    assert [dataset.options().autotune.enabled for dataset in datasets] == [False] * 7
