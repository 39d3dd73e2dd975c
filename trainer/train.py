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
import os
import shutil
import signal
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from trainer import data
from trainer import model as model_lib
from trainer.errors import UserError


class Preempted(Exception):
    """SIGTERM arrived (a preemption or a stopped job); a checkpoint was saved at this step."""


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
    def __init__(self, config, strategy, execution, classifier, folder, checkpoint_dir, log_dir,
                 chief):
        self.config = config
        self.strategy = strategy
        self.execution = execution
        self.classifier = classifier
        self.folder = folder
        self.chief = chief
        self.fine_tune_at = model_lib.fine_tune_layer(config.backbone, config.fine_tune_at)
        self.phases = phases(config)
        self.steps_per_epoch = data.steps_per_epoch(len(folder.train), config.batch_size)
        self.total_steps = self.phases[-1].end_epoch * self.steps_per_epoch

        with strategy.scope():
            self.optimizers = {}
            for phase in self.phases:
                optimizer = keras.optimizers.Adam(phase.learning_rate)
                if execution.policy == "mixed_float16":
                    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
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
        self.scratch = None if chief else tempfile.mkdtemp(prefix="trainer-worker-")
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, checkpoint_dir if chief else self.scratch, max_to_keep=2)
        self.writers = None
        if chief:
            self.writers = {split: tf.summary.create_file_writer(f"{log_dir}/{split}")
                            for split in ("train", "validation")}
        self._stop_requested = False
        self.caches_features = config.caches_features()
        self.phase_seconds = {}  # wall time of each phase in this process, caching included
        self.class_weights = tf.constant(
            data.class_weights(folder.train, len(folder.class_names)) if
            config.class_weight == "auto" else np.ones(len(folder.class_names)), tf.float32)
        self._feature_files = []
        # Backbone features of the validation split while they still match the backbone: from
        # the cached phase 1 until phase 2 changes it.
        self._validation_features = None

    # -- checkpoints -------------------------------------------------------------------------

    def restore(self):
        """Restores the latest checkpoint, if any; returns the step it was taken at, or None."""
        latest = tf.train.latest_checkpoint(self.checkpoint_dir)
        if not latest:
            return None
        try:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as error:
            raise UserError(f"checkpoint {latest} does not fit this job "
                            f"({str(error).splitlines()[0][:200]}); use another --model_dir or "
                            "--overwrite") from None
        return int(self.step.numpy())

    def _save(self, history, sums):
        self.state.assign(json.dumps({"history": history, "sums": sums}))
        self.manager.save(checkpoint_number=int(self.step.numpy()))

    # -- steps -------------------------------------------------------------------------------

    def _train_function(self, phase, cached):
        """A function running `steps` training steps; returns summed (loss, correct, count,
        stop), where stop > 0 if any worker was asked to stop. With cached features the steps
        run the head alone: the same variables, loss and optimizer as the whole model."""
        model_lib.set_phase(self.classifier, phase.name, self.fine_tune_at)
        variables = self.classifier.model.trainable_variables
        model = self.classifier.head if cached else self.classifier.model
        optimizer = self.optimizers[phase.name]
        global_batch = self.config.batch_size
        scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        class_weights = self.class_weights

        def replica_step(images, labels, weights, stop):
            with tf.GradientTape() as tape:
                logits = model(images, training=True)
                per_example = keras.losses.sparse_categorical_crossentropy(
                    labels, logits, from_logits=True)
                loss_weights = weights * tf.gather(class_weights, labels)
                loss = tf.reduce_sum(per_example * loss_weights) / global_batch
                if scaled:
                    loss = optimizer.scale_loss(loss)
            gradients = tape.gradient(loss, variables)
            optimizer.apply_gradients(zip(gradients, variables))
            # Every worker learns at this same step whether any of them was told to stop.
            stop_anywhere = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, tf.identity(stop))
            return _sums(labels, logits, per_example, weights) + (stop_anywhere,)

        if self.execution.jit_compile:
            replica_step = tf.function(replica_step, jit_compile=True)

        @tf.function
        def train_steps(iterator, steps, stop):
            totals = tf.zeros([4])
            for _ in tf.range(steps):
                per_replica = self.strategy.run(replica_step, args=next(iterator) + (stop,))
                totals += tf.stack(self._reduce(per_replica))
            return totals

        return train_steps

    def _reduce(self, per_replica):
        return [self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                for value in per_replica]

    def _images(self, split, order, weights):
        batch, size = self.config.batch_size, self.config.image_size
        return data.distribute(self.strategy, batch, lambda context: data.pipeline(
            split, order, weights, batch, size, context))

    def _arrays(self, array, split, order, weights):
        batch = self.config.batch_size
        return data.distribute(self.strategy, batch, lambda context: data.array_pipeline(
            array, split.labels, order, weights, batch, context))

    def _outputs(self, function, shape, split):
        """function(images) for every example of split, one pass under the strategy, gathered
        from all replicas so that every worker holds them all (float32, one row each)."""
        batch = self.config.batch_size
        order, weights = data.evaluation_order(len(split), batch)
        iterator = iter(self._images(split, order, weights))

        @tf.function
        def compute(iterator):
            images, _, _ = next(iterator)
            per_replica = self.strategy.run(lambda x: tf.cast(function(x), tf.float32),
                                            args=(images,))
            return self.strategy.gather(per_replica, axis=0)

        result = self._allocate((len(split), *shape))
        for step in range(len(order) // batch):
            # Padding rows repeat the first examples and write the same values again.
            result[order[step * batch:(step + 1) * batch]] = compute(iterator).numpy()
        return result

    def _extract_features(self, split):
        """The pooled backbone features of every example: one backbone pass."""
        features = self.classifier.features
        return self._outputs(lambda images: features(images, training=False),
                             features.output_shape[1:], split)

    def _decode_once(self):
        """Train and validation images decoded and resized once, when they fit within
        --memory_budget_mb, so that later epochs skip decoding; else None."""
        size = self.config.image_size
        count = len(self.folder.train) + len(self.folder.validation)
        if count * size * size * 3 * 4 > self.config.memory_budget_mb * 2**20:
            return None
        began = time.time()
        decoded = [self._outputs(tf.identity, (size, size, 3), split)
                   for split in (self.folder.train, self.folder.validation)]
        print(f"decoded {count} images once in {time.time() - began:.1f}s "
              f"({count * size * size * 12 / 2**20:.0f} MB in memory): later epochs read "
              "them from there", flush=True)
        return decoded

    def predict_validation(self):
        """Class probabilities of every validation example: the head on the cached features
        when the run ended in the cached phase, else one pass over the images."""
        if self._validation_features is not None:
            features = self._validation_features
            logits = np.concatenate([
                self.classifier.head(features[start:start + 1024], training=False)
                for start in range(0, len(features), 1024)])
            return tf.nn.softmax(tf.cast(logits, tf.float32)).numpy()
        inference = self.classifier.inference
        logits = self._outputs(lambda images: inference(images, training=False),
                               inference.output_shape[1:], self.folder.validation)
        return tf.nn.softmax(logits).numpy()

    def _allocate(self, shape):
        """Memory within --memory_budget_mb, else a file in the local temp dir."""
        if np.prod(shape) * 4 <= self.config.memory_budget_mb * 2**20:
            return np.zeros(shape, np.float32)
        handle, path = tempfile.mkstemp(prefix="trainer-features-", suffix=".npy")
        os.close(handle)
        self._feature_files.append(path)
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)

    def _evaluation(self, model, array=None):
        """A function computing (loss, accuracy) over the validation split, each example once,
        from image files or from an array of decoded images or features."""
        split = self.folder.validation
        order, weights = data.evaluation_order(len(split), self.config.batch_size)
        dataset = (self._arrays(array, split, order, weights) if array is not None
                   else self._images(split, order, weights))

        def replica_step(inputs, labels, weights):
            logits = model(inputs, training=False)
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

    def _chunk(self, step, epoch_end):
        """Steps to run in the next call: up to steps_per_execution, never past the end of the
        epoch or the next step checkpoint."""
        end = epoch_end
        every = self.config.checkpoint_every_steps
        if every:
            end = min(end, (step // every + 1) * every)
        return min(self.execution.steps_per_execution, end - step)

    def fit(self):
        """Trains from the current step to the end; returns the history of all epochs.

        Raises Preempted after saving a checkpoint if SIGTERM arrives on any worker.
        """
        start = int(self.step.numpy())
        state = json.loads(self.state.numpy().decode())
        history = state.get("history", [])
        sums = state.get("sums", [0.0, 0.0, 0.0])
        if start >= self.total_steps:
            return history
        every = self.config.checkpoint_every_steps
        decoded = None  # images decoded once, for the phases that read images
        previous_handler = signal.signal(signal.SIGTERM, self._request_stop)
        try:
            for phase in self.phases:
                if phase.end_epoch * self.steps_per_epoch <= start:
                    continue
                phase_began = time.time()
                first_step = max(start, phase.first_epoch * self.steps_per_epoch)
                phase_end = phase.end_epoch * self.steps_per_epoch
                cached = self.caches_features and phase.name == "head"
                order = data.train_order(len(self.folder.train), self.config.batch_size,
                                         self.config.seed, first_step, phase_end)
                ones = np.ones(len(order), dtype=np.float32)
                if cached:
                    began = time.time()
                    train_cache = self._extract_features(self.folder.train)
                    self._validation_features = self._extract_features(self.folder.validation)
                    evaluate = self._evaluation(self.classifier.head, self._validation_features)
                    inputs = self._arrays(train_cache, self.folder.train, order, ones)
                    print(f"cached backbone features of {len(self.folder.train)} train and "
                          f"{len(self.folder.validation)} validation images in "
                          f"{time.time() - began:.1f}s: phase {phase.name} trains the head "
                          "on them (--cache_features)", flush=True)
                else:
                    self._validation_features = None
                    if decoded is None:
                        decoded = self._decode_once() or ()
                    if decoded:
                        evaluate = self._evaluation(self.classifier.model, decoded[1])
                        inputs = self._arrays(decoded[0], self.folder.train, order, ones)
                    else:
                        evaluate = self._evaluation(self.classifier.model)
                        inputs = data.distribute(
                            self.strategy, self.config.batch_size,
                            lambda context: data.training_pipeline(
                                self.folder.train, first_step, phase_end,
                                self.config.batch_size, self.config.image_size,
                                self.config.seed, context, self.config.deterministic))
                iterator = iter(inputs)
                train_steps = self._train_function(phase, cached)
                for epoch in range(max(phase.first_epoch, start // self.steps_per_epoch),
                                   phase.end_epoch):
                    began = time.time()
                    progress = _progress_bar(self.steps_per_epoch)
                    epoch_end = (epoch + 1) * self.steps_per_epoch
                    step = int(self.step.numpy())
                    while step < epoch_end:
                        steps = self._chunk(step, epoch_end)
                        values = train_steps(iterator, tf.constant(steps),
                                             tf.constant(float(self._stop_requested))).numpy()
                        if not math.isfinite(values[0]):
                            raise UserError(
                                f"training loss became {values[0]} by step {step + steps} "
                                f"(epoch {epoch + 1}, phase {phase.name}); the last good "
                                "checkpoint was kept: lower the learning rate and run again")
                        sums = [total + float(value) for total, value in zip(sums, values[:3])]
                        step += steps
                        self.step.assign(step)
                        if progress:
                            progress.update(step - epoch * self.steps_per_epoch,
                                            [("loss", sums[0] / sums[2]),
                                             ("accuracy", sums[1] / sums[2])])
                        if values[3] > 0 and step < epoch_end:
                            self._save(history, sums)
                            raise Preempted(step)
                        if every and step % every == 0 and step < epoch_end:
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
                    if values[3] > 0:
                        raise Preempted(step)
                self.phase_seconds[phase.name] = round(time.time() - phase_began, 2)
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
        return history

    def _request_stop(self, signum, frame):
        del signum, frame
        self._stop_requested = True

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
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
        for path in self._feature_files:
            os.remove(path)


def _sums(labels, logits, per_example, weights):
    correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels),
                      tf.float32)
    return (tf.reduce_sum(per_example * weights), tf.reduce_sum(correct * weights),
            tf.reduce_sum(weights))


def _progress_bar(steps):
    """Keras's progress bar on a terminal; on Vertex logs one line per epoch is enough."""
    return keras.utils.Progbar(steps) if sys.stdout.isatty() else None
