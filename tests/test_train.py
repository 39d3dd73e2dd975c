"""The training loop in this process, on tiny data: fast enough for every change."""

import glob
import os
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import images
from trainer import config as config_lib
from trainer import model
from trainer import sources
from trainer import strategy as strategy_lib
from trainer import train
from trainer.errors import UserError


def tiny_trainer(tmp_path, **overrides):
    """A Trainer over 8 train images of 16 px with batch 8: one step an epoch."""
    source = sources.scan(images.folder(str(tmp_path / "data"), per_class=4,
                                        validation_per_class=1, size=16))
    values = dict(data="x", backbone="small_cnn", base_weights="none", image_size=16,
                  batch_size=8, epochs=1, fine_tune_epochs=1, learning_rate=1e-2,
                  fine_tune_learning_rate=1e-2, dropout=0.0, fine_tune_at=7)
    config = config_lib.Config(**{**values, **overrides})
    strategy = tf.distribute.get_strategy()
    keras.utils.set_random_seed(0)
    classifier = model.build("small_cnn", "none", 16, 2, config.dropout)
    schedule = train.Schedule.of(config, len(source.train), strategy.num_replicas_in_sync)
    execution = strategy_lib.execution("cpu", "off", 0, "off", schedule.steps_per_epoch)
    return train.Trainer(config, strategy, schedule, execution, classifier, source,
                         str(tmp_path / "checkpoints"), str(tmp_path / "logs"), True)


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


def test_leaving_the_trainer_on_an_error_removes_its_feature_files(tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(UserError, match="training loss became"):
        # Phase 1's features go to a file (over the memory budget); phase 2 blows up.
        with tiny_trainer(tmp_path, memory_budget_mb=0, fine_tune_learning_rate=1e30,
                          fine_tune_epochs=3) as trainer:
            trainer.fit(trainer.schedule.head)
            assert len(glob.glob(str(scratch / "trainer-*"))) == 2  # train, validation
            trainer.fit(trainer.schedule.fine_tune)
    assert not glob.glob(str(scratch / "trainer-*"))


def test_schedule_derives_the_run_quantities_once():
    config = config_lib.Config(data="x", batch_size=32, epochs=3, fine_tune_epochs=2)
    schedule = train.Schedule.of(config, 100, replicas=4)
    assert (schedule.steps_per_epoch, schedule.per_replica_batch, schedule.total_steps) == (
        4, 8, 20)
    assert [(p.name, p.first_epoch, p.end_epoch) for p in schedule.phases] == [
        ("head", 0, 3), ("fine_tune", 3, 5)]
    only_head = train.Schedule.of(config_lib.Config(data="x", fine_tune_epochs=0), 10, 1)
    assert [phase.name for phase in only_head.phases] == ["head"]


def test_a_batch_that_does_not_divide_over_the_replicas_is_refused():
    with pytest.raises(UserError, match="--batch_size=32 is global and must divide evenly "
                                        "over 3 replicas"):
        train.Schedule.of(config_lib.Config(data="x", batch_size=32), 100, replicas=3)


@pytest.mark.parametrize("step, every, due", [(10, 5, True), (11, 5, False), (10, 0, False)])
def test_periodic_actions_are_due_on_multiples_of_their_period(step, every, due):
    assert train.itstime(step, every) is due
