"""The training loop: our own step under strategy.run, checkpointed with tf.train.Checkpoint.

Not Keras fit + BackupAndRestore: fit fails under MultiWorkerMirroredStrategy with 2+ workers
in Keras 3.15, and BackupAndRestore restarts an interrupted epoch from its first batch. Here a
checkpoint holds the model, both phases' optimizers, the global step and the run's history;
the data position follows from the step (see data.py), so a resumed run continues at the
exact batch where the last checkpoint was taken.
"""

import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from trainer import data
from trainer import model as model_lib
from trainer.errors import UserError


@dataclasses.dataclass
class Phase:
    name: str           # "head" (backbone frozen) or "fine_tune"
    first_epoch: int
    end_epoch: int      # exclusive
    learning_rate: float


def phases(config):
    result = [Phase("head", 0, config.epochs, config.learning_rate)]
    if config.fine_tune_epochs:
        total = config.epochs + config.fine_tune_epochs
        result.append(Phase("fine_tune", config.epochs, total, config.fine_tune_learning_rate))
    return [phase for phase in result if phase.end_epoch > phase.first_epoch]


class Trainer:
    def __init__(self, config, strategy, classifier, folder, checkpoint_dir, log_dir, chief):
        self.config = config
        self.strategy = strategy
        self.classifier = classifier
        self.folder = folder
        self.chief = chief
        self.fine_tune_at = (config.fine_tune_at if config.fine_tune_at is not None
                             else model_lib.lookup(config.backbone).fine_tune_at)
        self.phases = phases(config)
        self.steps_per_epoch = data.steps_per_epoch(len(folder.train), config.batch_size)
        self.total_steps = self.phases[-1].end_epoch * self.steps_per_epoch

        with strategy.scope():
            self.optimizers = {}
            for phase in self.phases:
                optimizer = keras.optimizers.Adam(phase.learning_rate)
                model_lib.set_phase(classifier, phase.name, self.fine_tune_at)
                optimizer.build(classifier.model.trainable_variables)
                self.optimizers[phase.name] = optimizer
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.state = tf.Variable("{}", dtype=tf.string, trainable=False)
        self.checkpoint = tf.train.Checkpoint(
            model=classifier.model, step=self.step, state=self.state,
            **{f"{name}_optimizer": optimizer for name, optimizer in self.optimizers.items()})
        self.checkpoint_dir = checkpoint_dir
        # Every worker must take part in saving; only the chief's copy is kept.
        self._scratch = None if chief else tempfile.mkdtemp(prefix="trainer-worker-")
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, checkpoint_dir if chief else self._scratch, max_to_keep=2)
        self.writers = None
        if chief:
            self.writers = {split: tf.summary.create_file_writer(f"{log_dir}/{split}")
                            for split in ("train", "validation")}

    # -- checkpoints -------------------------------------------------------------------------

    def restore(self):
        """Restores the latest checkpoint, if any; returns the step it was taken at, or None."""
        latest = tf.train.latest_checkpoint(self.checkpoint_dir)
        if not latest:
            return None
        self.checkpoint.restore(latest).assert_existing_objects_matched()
        return int(self.step.numpy())

    def _save(self, history, sums):
        self.state.assign(json.dumps({"history": history, "sums": sums}))
        self.manager.save(checkpoint_number=int(self.step.numpy()))

    # -- steps -------------------------------------------------------------------------------

    def _train_function(self, phase):
        model = self.classifier.model
        model_lib.set_phase(self.classifier, phase.name, self.fine_tune_at)
        variables = model.trainable_variables
        optimizer = self.optimizers[phase.name]
        global_batch = self.config.batch_size

        def replica_step(images, labels, weights):
            with tf.GradientTape() as tape:
                logits = model(images, training=True)
                per_example = keras.losses.sparse_categorical_crossentropy(
                    labels, logits, from_logits=True)
                loss = tf.reduce_sum(per_example * weights) / global_batch
            gradients = tape.gradient(loss, variables)
            optimizer.apply_gradients(zip(gradients, variables))
            return _sums(labels, logits, per_example, weights)

        @tf.function
        def train_step(iterator):
            return self._reduce(self.strategy.run(replica_step, args=next(iterator)))

        return train_step

    def _reduce(self, per_replica):
        return [self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                for value in per_replica]

    def _evaluation(self):
        """A function computing (loss, accuracy) over the validation split, each example once."""
        model = self.classifier.model
        order, weights = data.evaluation_order(len(self.folder.validation), self.config.batch_size)
        dataset = data.distribute(self.strategy, self.folder.validation, order, weights,
                                  self.config.batch_size, self.config.image_size)

        def replica_step(images, labels, weights):
            logits = model(images, training=False)
            per_example = keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True)
            return _sums(labels, logits, per_example, weights)

        @tf.function
        def eval_step(iterator):
            return self._reduce(self.strategy.run(replica_step, args=next(iterator)))

        def evaluate():
            iterator = iter(dataset)
            totals = np.zeros(3)
            for _ in range(len(order) // self.config.batch_size):
                totals += [float(value) for value in eval_step(iterator)]
            return totals[0] / totals[2], totals[1] / totals[2]

        return evaluate

    # -- the loop ----------------------------------------------------------------------------

    def fit(self):
        """Trains from the current step to the end; returns the history of all epochs."""
        start = int(self.step.numpy())
        state = json.loads(self.state.numpy().decode())
        history = state.get("history", [])
        sums = state.get("sums", [0.0, 0.0, 0.0])
        if start >= self.total_steps:
            return history
        order = data.train_order(len(self.folder.train), self.config.batch_size,
                                 self.config.seed, start, self.total_steps)
        weights = np.ones(len(order), dtype=np.float32)
        iterator = iter(data.distribute(self.strategy, self.folder.train, order, weights,
                                        self.config.batch_size, self.config.image_size))
        every = self.config.checkpoint_every_steps
        evaluate = self._evaluation()
        for phase in self.phases:
            if phase.end_epoch * self.steps_per_epoch <= start:
                continue
            train_step = self._train_function(phase)
            first = max(phase.first_epoch, start // self.steps_per_epoch)
            for epoch in range(first, phase.end_epoch):
                began = time.time()
                progress = _progress_bar(self.steps_per_epoch)
                step_in_epoch = int(self.step.numpy()) - epoch * self.steps_per_epoch
                for _ in range(step_in_epoch, self.steps_per_epoch):
                    values = [float(value) for value in train_step(iterator)]
                    if not math.isfinite(values[0]):
                        raise UserError(
                            f"training loss became {values[0]} at step {int(self.step.numpy())} "
                            f"(epoch {epoch + 1}, phase {phase.name}); the last good checkpoint "
                            "was kept: lower the learning rate and run again")
                    sums = [total + value for total, value in zip(sums, values)]
                    self.step.assign_add(1)
                    if progress:
                        progress.update(int(self.step.numpy()) - epoch * self.steps_per_epoch,
                                        [("loss", sums[0] / sums[2]), ("accuracy", sums[1] / sums[2])])
                    if every and int(self.step.numpy()) % every == 0 and \
                            int(self.step.numpy()) % self.steps_per_epoch:
                        self._save(history, sums)
                val_loss, val_accuracy = evaluate()
                seconds = time.time() - began
                record = {"epoch": epoch + 1, "phase": phase.name, "loss": sums[0] / sums[2],
                          "accuracy": sums[1] / sums[2], "val_loss": val_loss,
                          "val_accuracy": val_accuracy, "seconds": round(seconds, 3),
                          "images_per_second": round(sums[2] / seconds, 1)}
                history.append(record)
                sums = [0.0, 0.0, 0.0]
                self._save(history, sums)
                self._log_epoch(record)
        return history

    def _log_epoch(self, record):
        print(f"epoch {record['epoch']}/{self.phases[-1].end_epoch} [{record['phase']}] "
              f"loss {record['loss']:.4f} accuracy {record['accuracy']:.4f} "
              f"val_loss {record['val_loss']:.4f} val_accuracy {record['val_accuracy']:.4f} "
              f"{record['seconds']:.1f}s {record['images_per_second']:.0f} images/s", flush=True)
        if self.writers:
            for split, prefix in (("train", ""), ("validation", "val_")):
                with self.writers[split].as_default(step=record["epoch"]):
                    tf.summary.scalar("epoch_loss", record[f"{prefix}loss"])
                    tf.summary.scalar("epoch_accuracy", record[f"{prefix}accuracy"])
                self.writers[split].flush()

    def close(self):
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)


def _sums(labels, logits, per_example, weights):
    correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels),
                      tf.float32)
    return (tf.reduce_sum(per_example * weights), tf.reduce_sum(correct * weights),
            tf.reduce_sum(weights))


def _progress_bar(steps):
    """Keras's progress bar on a terminal; on Vertex logs one line per epoch is enough."""
    return keras.utils.Progbar(steps) if sys.stdout.isatty() else None
