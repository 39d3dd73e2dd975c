"""The training loop in this process, on tiny data: fast enough for every change."""

import glob
import re
import os
import signal
import tempfile
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import images
from trainer import cache
from trainer import caching
from trainer import config as config_lib
from trainer import model
from trainer import phase_data
from trainer import sources
from trainer import strategy as strategy_lib
from trainer import train
from trainer.errors import Stopped, UserError


def tiny_trainer(tmp_path, data=None, adjust=None, stop=None, **overrides):
    """A Trainer over 8 train images of 16 px with batch 8: one step an epoch. data: another
    image folder to train on; adjust(classifier) before the pass over the images; stop: the
    train.StopSignals to heed."""
    source = sources.scan(data or tiny_data(tmp_path / "data"))
    values = dict(data="x", backbone="small_cnn", base_weights="none", image_size=16,
                  batch_size=8, epochs=1, fine_tune_epochs=1, learning_rate=1e-2,
                  fine_tune_learning_rate=1e-2, dropout=0.0, fine_tune_at=7)
    config = config_lib.Config(**{**values, **overrides})
    strategy = tf.distribute.get_strategy()
    keras.utils.set_random_seed(0)
    classifier = model.build(config.backbone, "none", config.image_size, 2, config.dropout,
                             config.augmentations())
    if adjust:
        adjust(classifier)
    stop = stop or train.StopSignals()
    listed = train.Schedule.of(config, len(source.train), strategy.num_replicas_in_sync)
    data = phase_data.read_images_once(
        config, strategy, "float32", source, classifier,
        model.fine_tune_layer(config.backbone, config.fine_tune_at),
        str(tmp_path / "cache"), True, lambda: stop.between_batches(False),
        train.starting_phase(listed, str(tmp_path / "checkpoints")))
    schedule = train.Schedule.of(config, len(data.source.train), strategy.num_replicas_in_sync)
    execution = strategy_lib.execution("cpu", "off", 0, "off", schedule.steps_per_epoch)
    return train.Trainer(config, strategy, schedule, execution, classifier, data, stop,
                         str(tmp_path / "checkpoints"), str(tmp_path / "logs"), True)


def tiny_data(folder):
    """Written once: a later trainer on the same folder sees the same files."""
    if os.path.isdir(folder):
        return str(folder)
    return images.folder(str(folder), per_class=4, validation_per_class=1, size=16)


def test_two_steps_train_the_head_then_the_top_of_the_backbone(tmp_path):
    with tiny_trainer(tmp_path) as trainer:
        classifier = trainer.classifier
        backbone_before = [w.numpy() for w in classifier.backbone.weights]
        head_before = [w.numpy() for w in classifier.head.weights]
        trainer.fit(trainer.schedule.head)
        assert int(trainer.step.numpy()) == 1
        # Phase 1 moved the head alone.
        for before, after in zip(backbone_before, classifier.backbone.weights):
            np.testing.assert_array_equal(before, after.numpy())
        assert not all(np.array_equal(b, a.numpy())
                       for b, a in zip(head_before, classifier.head.weights))
        history = trainer.fit(trainer.schedule.fine_tune)
    assert int(trainer.step.numpy()) == 2
    assert [(row["epoch"], row["phase"]) for row in history] == [(1, "head"), (2, "fine_tune")]
    assert all(np.isfinite(row["loss"]) and 0 <= row["val_accuracy"] <= 1 for row in history)
    changed = [not np.array_equal(before, after.numpy())
               for before, after in zip(backbone_before, classifier.backbone.weights)]
    assert any(changed) and not all(changed)  # below fine_tune_at, nothing moved
    assert sorted(os.path.basename(path) for path in
                  glob.glob(str(tmp_path / "checkpoints" / "ckpt-*.index"))) == [
        "ckpt-1.index", "ckpt-2.index"]


def test_a_fresh_trainer_resumes_the_recorded_history(tmp_path):
    with tiny_trainer(tmp_path) as trainer:
        trainer.fit(trainer.schedule.head)
    with tiny_trainer(tmp_path) as again:
        assert again.restore() == 1
        assert [row["phase"] for row in again.history] == ["head"]
        assert again.fit(again.schedule.head) == again.history  # done already: nothing to do
        assert len(again.fit(again.schedule.fine_tune)) == 2


@pytest.mark.parametrize("randomness", [dict(dropout=0.5), dict(augment="flip,rotate")])
def test_a_resumed_run_trains_bit_for_bit_like_an_uninterrupted_one(tmp_path, randomness):
    settings = dict(batch_size=4, epochs=2, fine_tune_epochs=2, **randomness)  # 2 steps an epoch
    with tiny_trainer(tmp_path / "whole", **settings) as whole:
        whole.fit(whole.schedule.head)
        whole.fit(whole.schedule.fine_tune)
    with tiny_trainer(tmp_path / "stopped", **settings) as first:
        # Stopped by a signal during step 3: checkpointed after it, mid-epoch 2.
        chunk = first._chunk
        first._chunk = lambda step, end: (step == 2 and first.stop._request(signal.SIGTERM, None)
                                          or chunk(step, end))
        with pytest.raises(Stopped):
            first.fit(first.schedule.head)
    with tiny_trainer(tmp_path / "stopped", **settings) as resumed:
        assert resumed.restore() == 3
        resumed.fit(resumed.schedule.head)
        resumed.fit(resumed.schedule.fine_tune)
    def metrics(history):
        return [[row[key] for key in ("loss", "accuracy", "val_loss", "val_accuracy")]
                for row in history]
    assert metrics(resumed.history) == metrics(whole.history)
    for mine, theirs in zip(resumed.classifier.model.weights, whole.classifier.model.weights):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())


def test_a_storage_outage_mid_training_goes_on_from_the_last_checkpoint(tmp_path, monkeypatch):
    settings = dict(batch_size=4, epochs=3, fine_tune_epochs=0, dropout=0.5)
    with tiny_trainer(tmp_path / "whole", **settings) as whole:
        whole.fit(whole.schedule.head)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # the backoff's waits
    with tiny_trainer(tmp_path / "outage", **settings) as trainer:
        run_epoch, calls = trainer._run_epoch, []

        def failing_once_in_epoch_2(*args):
            calls.append(args[1])
            if calls == [0, 1]:
                raise tf.errors.UnavailableError(None, None, "storage is away")
            return run_epoch(*args)

        trainer._run_epoch = failing_once_in_epoch_2
        trainer.fit(trainer.schedule.head)
    assert calls == [0, 1, 1, 2]  # epoch 2 again, from the checkpoint after epoch 1
    assert [row["loss"] for row in trainer.history] == [row["loss"] for row in whole.history]
    for mine, theirs in zip(trainer.classifier.model.weights, whole.classifier.model.weights):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())


def test_storage_failing_past_the_budget_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    clock = iter(range(0, 10_000, 7))
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    with tiny_trainer(tmp_path, storage_retry_seconds=30) as trainer:
        def away(*args):
            raise tf.errors.AbortedError(None, None, "All 2 retry attempts failed")
        trainer._run_epoch = away
        with pytest.raises(UserError, match=r"storage failed for \d+s while training \(phase "
                                            r"head\) \(All 2 retry attempts failed\); what was "
                                            r"written is kept"):
            trainer.fit(trainer.schedule.head)


def test_feature_files_are_unlinked_while_in_use_so_no_death_leaves_them(tmp_path, monkeypatch):
    """A file is gone from the temp dir as soon as it is mapped: a SIGKILL can leave none."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with tiny_trainer(tmp_path, memory_budget_mb=0) as trainer:
        trainer.fit(trainer.schedule.head)
        # Features and activations at the cut of train and validation, in files.
        arrays = [array for splits in trainer.data._arrays_of.values() for split in splits
                  for array in split]
        assert len(arrays) == 4 and all(isinstance(array, np.memmap) for array in arrays)
        assert not glob.glob(str(scratch / "trainer-*"))
        trainer.fit(trainer.schedule.fine_tune)
    assert trainer.history[-1]["phase"] == "fine_tune"


def _small_chunks(monkeypatch):
    """Chunks of 2 rows: the 8 train images of tiny_data are 4 chunks an entry."""
    monkeypatch.setattr(caching, "CHUNK_ROWS", (2, 2))


def test_a_stop_in_the_pass_keeps_its_chunks_and_a_rerun_reads_only_the_rest(tmp_path,
                                                                           monkeypatch):
    _small_chunks(monkeypatch)
    stop, publish = train.StopSignals(), cache.SharedCache.publish

    def publish_then_stop(shared, *args):  # SIGTERM as the first chunk is kept
        publish(shared, *args)
        stop._request(signal.SIGTERM, None)

    monkeypatch.setattr(cache.SharedCache, "publish", publish_then_stop)
    with pytest.raises(Stopped) as stopped:
        tiny_trainer(tmp_path / "run", stop=stop, batch_size=2)
    assert (stopped.value.signal, stopped.value.step) == ("SIGTERM", None)
    # Both phases' first chunk (rows 0-1 of train) came out of the first batch.
    kept = sorted(os.listdir(tmp_path / "run" / "cache"))
    assert [name.rsplit("-", 3)[1:] for name in kept] == [
        ["train", "000000000", "000000002.bin"]] * 2
    monkeypatch.setattr(cache.SharedCache, "publish", publish)
    with tiny_trainer(tmp_path / "run", batch_size=2) as rerun:
        assert rerun.data.images_read == 8 + 2 - 2  # all but the chunk kept
        rerun.fit(rerun.schedule.head)
        rerun.fit(rerun.schedule.fine_tune)
    with tiny_trainer(tmp_path / "fresh", batch_size=2) as fresh:
        assert fresh.data.images_read == 8 + 2
        fresh.fit(fresh.schedule.head)
        fresh.fit(fresh.schedule.fine_tune)
    assert [(row["loss"], row["val_loss"]) for row in rerun.history] == [
        (row["loss"], row["val_loss"]) for row in fresh.history]


def test_a_resumed_run_reads_no_image(tmp_path, monkeypatch, capsys):
    _small_chunks(monkeypatch)
    settings = dict(batch_size=4, epochs=1, fine_tune_epochs=2, dropout=0.5)
    with tiny_trainer(tmp_path / "run", **settings) as first:
        first.fit(first.schedule.head)
    # Same sizes and times, other bytes: what a listing shows is unchanged, and any image the
    # job read would fail to decode and be left out.
    for image in glob.glob(str(tmp_path / "run" / "data" / "*" / "*" / "*.jpg")):
        status = os.stat(image)
        with open(image, "r+b") as handle:
            handle.write(b"\0" * status.st_size)
        os.utime(image, ns=(status.st_atime_ns, status.st_mtime_ns))
    capsys.readouterr()
    read, original = [], cache.SharedCache.read
    monkeypatch.setattr(cache.SharedCache, "read",
                        lambda shared, name: read.append(name) or original(shared, name))
    with tiny_trainer(tmp_path / "run", **settings) as resumed:
        assert resumed.data.images_read == 0
        assert (len(resumed.source.train), len(resumed.source.validation)) == (8, 2)
        # Resumed in phase 2: phase 1's features are never read.
        out = capsys.readouterr().out
        assert ("read activations entering layer 7 of 8 train and 2 validation images from "
                in out)
        assert "backbone features of small_cnn at 16 px found in " in out
        assert resumed.restore() == 2
        resumed.fit(resumed.schedule.head)
        resumed.fit(resumed.schedule.fine_tune)
        probabilities = resumed.predict_validation()
    assert len(resumed.history) == 3
    assert len(read) == 5 and all("-activations-" in name for name in read)
    # Stopped after training, before the report: the rerun's report reads no image either
    # (one read would fail to decode, and the report stop with an error).
    with tiny_trainer(tmp_path / "run", **settings) as rerun:
        assert rerun.restore() == rerun.schedule.total_steps
        rerun.fit(rerun.schedule.head)
        rerun.fit(rerun.schedule.fine_tune)
        np.testing.assert_allclose(rerun.predict_validation(), probabilities)
        assert rerun.data.images_read == 0
    assert len(read) == 10 and all("-activations-" in name for name in read)


def test_schedule_derives_the_run_quantities_once():
    config = config_lib.Config(data="x", batch_size=32, epochs=3, fine_tune_epochs=2)
    schedule = train.Schedule.of(config, 100, replicas=4)
    assert (schedule.steps_per_epoch, schedule.per_replica_batch, schedule.total_steps) == (
        4, 8, 20)
    assert [(p.name, p.first_epoch, p.end_epoch) for p in schedule.phases] == [
        ("head", 0, 3), ("fine_tune", 3, 5)]
    # Where a job goes on from a step; the last phase once training is done.
    assert [schedule.phase_at(step).name for step in (0, 11, 12, 19, 20)] == [
        "head", "head", "fine_tune", "fine_tune", "fine_tune"]
    only_head = train.Schedule.of(config_lib.Config(data="x", fine_tune_epochs=0), 100, 1)
    assert [phase.name for phase in only_head.phases] == ["head"]


def test_a_batch_that_does_not_divide_over_the_replicas_is_refused():
    with pytest.raises(UserError, match="--batch_size=32 is global and must divide evenly "
                                        "over 3 replicas"):
        train.Schedule.of(config_lib.Config(data="x", batch_size=32), 100, replicas=3)


def test_a_batch_larger_than_the_training_set_is_refused_with_the_largest_that_fits():
    with pytest.raises(UserError, match="--batch_size=100000 is larger than the 300 training "
                                        "images: use at most 296"):
        train.Schedule.of(config_lib.Config(data="x", batch_size=100000), 300, replicas=8)


@pytest.mark.parametrize("step, every, due", [(10, 5, True), (11, 5, False), (10, 0, False)])
def test_periodic_actions_are_due_on_multiples_of_their_period(step, every, due):
    assert train.itstime(step, every) is due


def _damage(prefix, how):
    if how == "truncated data":
        path, = glob.glob(f"{prefix}.data-*")
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
    elif how == "deleted index":
        os.remove(f"{prefix}.index")
    else:  # random bytes over the index
        with open(f"{prefix}.index", "wb") as handle:
            handle.write(np.random.default_rng(0).bytes(300))


@pytest.mark.parametrize("how", ["truncated data", "deleted index", "random bytes"])
def test_a_damaged_newest_checkpoint_resumes_from_the_one_before_it(tmp_path, how):
    with tiny_trainer(tmp_path, fine_tune_epochs=2) as trainer:
        trainer.fit(trainer.schedule.head)
        trainer.fit(trainer.schedule.fine_tune)
    _damage(str(tmp_path / "checkpoints" / "ckpt-3"), how)
    with tiny_trainer(tmp_path, fine_tune_epochs=2) as again:
        assert again.restore() == 2
        assert len(again.history) == 2
        # Set aside, not deleted; the good one stays among those kept.
        assert glob.glob(str(tmp_path / "checkpoints" / "damaged-ckpt-3.*"))
        again.fit(again.schedule.fine_tune)
    assert os.path.exists(tmp_path / "checkpoints" / "ckpt-3.index")
    with tiny_trainer(tmp_path, fine_tune_epochs=2) as finished:
        assert finished.restore() == 3


def test_after_a_damaged_checkpoint_is_set_aside_only_the_newest_two_are_kept(tmp_path):
    settings = dict(epochs=4, fine_tune_epochs=0)  # a step an epoch
    with tiny_trainer(tmp_path, **settings) as first:
        chunk = first._chunk
        first._chunk = lambda step, end: (step == 2 and first.stop._request(signal.SIGTERM, None)
                                          or chunk(step, end))
        with pytest.raises(Stopped):
            first.fit(first.schedule.head)
    _damage(str(tmp_path / "checkpoints" / "ckpt-3"), "truncated data")
    with tiny_trainer(tmp_path, **settings) as again:
        assert again.restore() == 2
        again.fit(again.schedule.head)
    assert sorted(name for name in os.listdir(tmp_path / "checkpoints")
                  if name.endswith(".index")) == ["ckpt-3.index", "ckpt-4.index",
                                                  "damaged-ckpt-3.index"]


def test_no_readable_checkpoint_stops_instead_of_starting_again(tmp_path):
    with tiny_trainer(tmp_path) as trainer:
        trainer.fit(trainer.schedule.head)
        trainer.fit(trainer.schedule.fine_tune)
    for step in (1, 2):
        _damage(str(tmp_path / "checkpoints" / f"ckpt-{step}"), "random bytes")
    with tiny_trainer(tmp_path) as again:
        with pytest.raises(UserError, match=r"none of the 2 checkpoint\(s\) in .* can be read"):
            again.restore()


def _scalars(folder):
    """{tag: [(step, value)]} of the TensorBoard event files in folder."""
    found = {}
    for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor))
                found.setdefault(value.tag, []).append((event.step, number))
    return found


def test_the_epoch_line_and_tensorboard_show_training_apart_from_validation(tmp_path, capsys):
    with tiny_trainer(tmp_path, batch_size=4, log_every_steps=1) as trainer:
        trainer.fit(trainer.schedule.head)
        history = trainer.fit(trainer.schedule.fine_tune)
    line = capsys.readouterr().out.splitlines()[-1]
    assert re.search(r"^epoch 2/2 \[fine_tune\] .* train \d+\.\d+s \d+ images/s, validation "
                     r"\d+\.\d+s$", line), line
    assert all(row["val_seconds"] >= 0 and row["images_per_second"] > 0 for row in history)
    train = _scalars(str(tmp_path / "logs" / "train"))
    assert [step for step, _ in train["step_loss"]] == [1, 2, 3, 4]  # 2 steps an epoch
    assert train["learning_rate"] == [(1, pytest.approx(1e-2)), (2, pytest.approx(1e-2))]
    assert [step for step, _ in train["images_per_second"]] == [1, 2]
    assert [step for step, _ in _scalars(str(tmp_path / "logs" / "validation"))["epoch_loss"]] == [
        1, 2]


def _run_both_phases(tmp_path, **settings):
    """(history, every model weight, validation probabilities, the trainer) of a whole run."""
    with tiny_trainer(tmp_path, **settings) as trainer:
        trainer.fit(trainer.schedule.head)
        trainer.fit(trainer.schedule.fine_tune)
        return (trainer.history, [weight.numpy() for weight in trainer.classifier.model.weights],
                trainer.predict_validation(), trainer)


# Without pretrained weights MobileNetV2's activations are tiny (1e-9: its BatchNorm statistics
# are the identity): float16 cannot hold them, so the activations stay float32 and the runs
# agree as closely as float32 arithmetic allows. The others' are large enough for float16,
# as a pretrained backbone's are: rounded to 2^-11 of their value, and the runs agree to
# within that, grown over 4 Adam steps.
@pytest.mark.parametrize("backbone, size, stored, tolerance", [
    ("small_cnn", 16, "float16", 2e-3),
    pytest.param("mobilenet_v2", 32, "float32", 1e-5, marks=pytest.mark.slow),
    pytest.param("efficientnet_b0", 32, "float16", 2e-3, marks=pytest.mark.slow),
    pytest.param("resnet50", 32, "float16", 2e-3, marks=pytest.mark.slow),
])
def test_both_cached_phases_train_like_the_whole_model(tmp_path, backbone, size, stored,
                                                       tolerance):
    settings = dict(backbone=backbone, image_size=size, fine_tune_at=None, batch_size=4,
                    epochs=2, fine_tune_epochs=2, dropout=0.3, learning_rate=1e-3,
                    fine_tune_learning_rate=1e-4)
    whole = _run_both_phases(tmp_path / "whole", cache_features="off", **settings)
    cached = _run_both_phases(tmp_path / "cached", **settings)
    assert [name for name, inputs in cached[3].data.inputs.items() if inputs.cached] == [
        "head", "fine_tune"]
    assert {array.dtype.name for array in cached[3].data._arrays_of["fine_tune"][0]} == {stored}
    assert len(cached[0]) == len(whole[0]) == 4 and len(cached[1]) == len(whole[1]) > 0
    for mine, theirs in zip(cached[0], whole[0]):
        assert mine["phase"] == theirs["phase"]
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert mine[key] == pytest.approx(theirs[key], rel=tolerance, abs=tolerance), key
    for mine, theirs in zip(cached[1], whole[1]):
        np.testing.assert_allclose(mine, theirs, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(cached[2], whole[2], rtol=tolerance, atol=tolerance)


def test_float16_holds_activations_unless_they_overflow_or_underflow():
    rng = np.random.default_rng(0)
    assert cache.fits_float16(rng.normal(0, 3, 1000).astype(np.float32))
    assert cache.fits_float16(np.zeros(10, np.float32))
    assert not cache.fits_float16(np.array([1.0, 7e4], np.float32))  # past 65504
    assert not cache.fits_float16(rng.normal(0, 1e-9, 1000).astype(np.float32))


def test_a_run_resumed_in_phase_two_trains_alike(tmp_path, capsys):
    settings = dict(batch_size=4, epochs=1, fine_tune_epochs=2, dropout=0.5)
    whole = _run_both_phases(tmp_path / "whole", **settings)
    with tiny_trainer(tmp_path / "resumed", **settings) as first:
        first.fit(first.schedule.head)
    with tiny_trainer(tmp_path / "resumed", **settings) as resumed:
        assert resumed.restore() == 2
        resumed.fit(resumed.schedule.fine_tune)
        assert [row["loss"] for row in resumed.history] == [row["loss"] for row in whole[0]]
        for mine, theirs in zip(resumed.classifier.model.weights, whole[1]):
            np.testing.assert_array_equal(mine.numpy(), theirs)
def test_the_resume_line_names_the_epoch_that_goes_on_and_how_far_into_it():
    from trainer import task
    schedule = train.Schedule.of(config_lib.Config(batch_size=8, epochs=4, fine_tune_epochs=5),
                                 32, 1)  # 4 steps an epoch, 9 epochs, 36 steps
    assert task.resume_line(19, schedule) == (
        "resuming at step 19 of 36: epoch 5/9, 3 of its 4 steps done")
    assert task.resume_line(20, schedule) == "resuming at step 20 of 36: epoch 6/9, from its start"
    assert task.resume_line(36, schedule) == (
        "resuming at step 36 of 36: training is done; evaluating and exporting")


def test_a_loss_that_blows_up_before_any_checkpoint_says_none_was_kept(tmp_path):
    with tiny_trainer(tmp_path, batch_size=4, epochs=0, fine_tune_epochs=3,
                      fine_tune_learning_rate=1e30) as trainer:
        with pytest.raises(UserError, match="training loss became .* by step [12] .*; no "
                                            "checkpoint had been written yet: lower"):
            trainer.fit(trainer.schedule.fine_tune)


def test_a_second_ctrl_c_raises_at_once(capfd):
    """The first Ctrl-C asks for a stop at the next step (and says so); the second one raises
    KeyboardInterrupt where the job is; leaving the with-block restores the handlers."""
    stop = train.StopSignals()
    before = signal.getsignal(signal.SIGINT)
    with stop.caught():
        signal.raise_signal(signal.SIGINT)
        assert stop.requested == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    assert capfd.readouterr().err == ("SIGINT: stopping at the next step or batch, keeping the "
                                      "work done; Ctrl-C again to stop at once\n")
