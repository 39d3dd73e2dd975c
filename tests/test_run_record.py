"""The record of the run (trainer/run_record.py): epoch records, the epoch line, what a checkpoint
keeps of them, and the TensorBoard writers."""

import glob
import os

import numpy as np

from trainer import train
from trainer.run_record import RunRecord

HEAD = train.Phase("head", 0, 2, 1e-3)
SETTINGS = [{"learning_rate": 1e-3, "dropout": 0.0, "label_smoothing": 0.0},
            {"learning_rate": 1e-2, "dropout": 0.0, "label_smoothing": 0.0}]


def test_an_epoch_record_holds_its_figures_and_the_sums_start_again():
    record = RunRecord(1, None, 4)
    assert record.start_epoch(1) == 0
    record.add(2, np.array([[1.2, 6.0, 8.0]]), log_every_steps=0)
    record.add(4, np.array([[0.8, 7.0, 8.0]]), log_every_steps=0)
    assert record.running_metrics() == [("loss", 0.125), ("accuracy", 13 / 16)]
    [row] = record.end_epoch(HEAD, 0, [(0.5, 0.75)], [1e-3], seconds=2.0, val_seconds=0.5,
                             trained=16, sweeping=False)
    assert row == {"epoch": 1, "phase": "head", "loss": 0.125, "accuracy": 13 / 16,
                   "val_loss": 0.5, "val_accuracy": 0.75, "seconds": 2.0,
                   "images_per_second": 8.0, "val_seconds": 0.5, "learning_rate": 1e-3}
    assert record.history == [row] and record.sums is None


def test_a_checkpoint_keeps_the_history_and_the_sums_of_the_epoch_in_progress():
    record = RunRecord(2, None, 4)
    record.start_epoch(2)
    record.add(1, np.array([[1.0, 2.0, 4.0], [3.0, 1.0, 4.0]]), 0)
    record.head_histories[1].append({"epoch": 1})
    again = RunRecord(2, None, 4)
    again.load(record.state())
    np.testing.assert_array_equal(again.sums, record.sums)
    assert again.start_epoch(2) == 4  # the images trained before the stop still count
    assert (again.history, again.head_histories) == ([], [[], [{"epoch": 1}]])
    fresh = RunRecord(2, None, 4)
    fresh.load({"history": [], "sums": None})
    assert fresh.sums is None and fresh.head_histories == [[], []]


def test_a_sweep_records_each_head_and_the_chosen_curve_becomes_the_run(tmp_path, capsys):
    record = RunRecord(2, str(tmp_path / "logs"), 4)
    for epoch in range(2):
        record.start_epoch(2)
        record.add(epoch + 1, np.array([[1.0, 4.0, 8.0], [0.5, 6.0, 8.0]]), 0)
        records = record.end_epoch(HEAD, epoch, [(0.6, 0.5), (0.4, 0.875)], [1e-3, 1e-2],
                                   1.0, 0.1, 8, sweeping=True)
        record.log_epoch(records, True, SETTINGS)
    assert record.history == [] and [len(h) for h in record.head_histories] == [2, 2]
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("epoch 2/4 [head] 2 heads, best val_accuracy 0.8750 "
                           "(learning_rate=0.01)")
    record.adopt(1)
    assert record.history == record.head_histories[1]
    folders = sorted(os.path.relpath(path, tmp_path / "logs") for path in
                     glob.glob(str(tmp_path / "logs" / "**" / "events.*"), recursive=True))
    assert [os.path.dirname(path) for path in folders] == [
        "head_sweep/learning_rate=0.001/train", "head_sweep/learning_rate=0.001/validation",
        "head_sweep/learning_rate=0.01/train", "head_sweep/learning_rate=0.01/validation",
        "train", "validation"]


def test_a_worker_that_is_not_the_chief_writes_no_summary(tmp_path):
    record = RunRecord(1, None, 2)
    record.start_epoch(1)
    record.add(10, np.array([[1.0, 1.0, 2.0]]), log_every_steps=10)
    record.log_epoch(record.end_epoch(HEAD, 0, [(1.0, 0.5)], [1e-3], 1, 0, 2, False), False,
                     SETTINGS[:1])
    assert record.writers is None and not os.listdir(tmp_path)

