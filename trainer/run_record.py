"""The record of the run: what each epoch gave, and where it is told.

Owns the epoch records (`history`, both phases; while --head_sweep trains its heads, one
history a head), the running (loss, correct, count) sums of the epoch in progress, the epoch
line, and the TensorBoard writers: the run's train/ and validation/, and one pair a head
under head_sweep/<settings>/. state() is what a checkpoint keeps of it; metrics.json takes
`history`. Only the chief writes summaries (log_dir None elsewhere). It computes no metric and
touches no model: the loop hands it sums and validation figures.
"""

import numpy as np
import tensorflow as tf

from trainer import sweep


def itstime(step, every):
    """Whether a periodic action set to run every `every` steps (0: never) is due at `step`."""
    return bool(every) and step % every == 0


class RunRecord:
    def __init__(self, heads, log_dir, total_epochs):
        self.history = []  # one record per finished epoch, both phases
        self.head_histories = [[] for _ in range(heads)]
        # Loss, correct and count of the epoch so far, a row per model trained (None: zero).
        self.sums = None
        self.log_dir = log_dir
        self.total_epochs = total_epochs
        self.writers = _writers(log_dir) if log_dir else None
        self._head_writers = {}  # a head of --head_sweep's name: its writers

    def state(self):
        return {"history": self.history,
                "sums": None if self.sums is None else self.sums.tolist(),
                "head_histories": self.head_histories}

    def load(self, state):
        self.history = state.get("history", [])
        sums = state.get("sums")
        self.sums = None if sums is None else np.reshape(sums, (-1, 3))
        self.head_histories = state.get("head_histories", self.head_histories)

    def start_epoch(self, models):
        """Returns the images of this epoch trained before a resume."""
        if self.sums is None:
            self.sums = np.zeros((models, 3))
        return self.sums[0, 2]

    def add(self, step, sums, log_every_steps):
        """The sums of the steps up to `step`; the training loss to TensorBoard when due (of
        the one model trained: a sweep's heads have their epoch curves)."""
        self.sums = self.sums + sums
        if self.writers and len(sums) == 1 and itstime(step, log_every_steps):
            with self.writers["train"].as_default(step=step):
                tf.summary.scalar("step_loss", sums[0, 0] / sums[0, 2])

    def running_metrics(self):
        loss, correct, count = self.sums[0]
        return [("loss", loss / count), ("accuracy", correct / count)]

    def end_epoch(self, phase, epoch, validation, learning_rates, seconds, val_seconds, trained,
                  sweeping):
        """Records an epoch: one record a model trained, into the heads' histories while
        sweeping, else the run's. seconds: its training time in this process, validation
        apart, in which `trained` images went through training. Returns the records."""
        records = [{"epoch": epoch + 1, "phase": phase.name, "loss": loss / count,
                    "accuracy": correct / count, "val_loss": val_loss,
                    "val_accuracy": val_accuracy, "seconds": round(seconds, 3),
                    "images_per_second": round(trained / max(seconds, 1e-6), 1),
                    "val_seconds": val_seconds, "learning_rate": learning_rate}
                   for (loss, correct, count), (val_loss, val_accuracy), learning_rate
                   in zip(self.sums.tolist(), validation, learning_rates)]
        if sweeping:
            for history, record in zip(self.head_histories, records):
                history.append(record)
        else:
            self.history.append(records[0])
        self.sums = None
        return records

    def adopt(self, chosen):
        """After a sweep's phase 1: the chosen head's curve becomes the run's."""
        self.history = self.head_histories[chosen] + self.history
        if self.writers:
            for record in self.head_histories[chosen]:
                _summarise(record, self.writers)

    def log_epoch(self, records, sweeping, head_settings):
        """The epoch's line, and its TensorBoard scalars: under the run's train/ and
        validation/, or, for the heads of --head_sweep, under head_sweep/<head>/."""
        record = records[0]
        names = sweep.varied(head_settings)
        if sweeping:
            best = sweep.choose([[each] for each in records])
            figures = (f"{len(records)} heads, best val_accuracy "
                       f"{records[best]['val_accuracy']:.4f} "
                       f"({sweep.label(head_settings[best], names)})")
        else:
            figures = (f"loss {record['loss']:.4f} accuracy {record['accuracy']:.4f} "
                       f"val_loss {record['val_loss']:.4f} "
                       f"val_accuracy {record['val_accuracy']:.4f}")
        print(f"epoch {record['epoch']}/{self.total_epochs} [{record['phase']}] "
              f"{figures} train {record['seconds']:.1f}s {record['images_per_second']:.0f} "
              f"images/s, validation {record['val_seconds']:.1f}s", flush=True)
        if not self.writers:
            return
        if not sweeping:
            _summarise(record, self.writers)
            return
        for point, each in zip(head_settings, records):
            folder = sweep.label(point, names).replace(", ", ",")
            if folder not in self._head_writers:
                self._head_writers[folder] = _writers(f"{self.log_dir}/head_sweep/{folder}")
            _summarise(each, self._head_writers[folder])


def _writers(log_dir):
    return {split: tf.summary.create_file_writer(f"{log_dir}/{split}")
            for split in ("train", "validation")}


def _summarise(record, writers):
    for split, prefix in (("train", ""), ("validation", "val_")):
        with writers[split].as_default(step=record["epoch"]):
            tf.summary.scalar("epoch_loss", record[f"{prefix}loss"])
            tf.summary.scalar("epoch_accuracy", record[f"{prefix}accuracy"])
            if split == "train":
                tf.summary.scalar("learning_rate", record["learning_rate"])
                tf.summary.scalar("images_per_second", record["images_per_second"])
        writers[split].flush()
