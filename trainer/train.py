"""The training loop: our own step under strategy.run, checkpointed with tf.train.Checkpoint.

Not Keras fit + BackupAndRestore: fit fails under MultiWorkerMirroredStrategy with 2+ workers
in Keras 3.15, and BackupAndRestore restarts an interrupted epoch from its first batch. Here a
checkpoint holds the model, both phases' optimizers, the global step and the run's history;
the data position follows from the step (see pipelines.py), so a resumed run continues at the
exact batch where the last checkpoint was taken.

Each phase reads one of four inputs, chosen before training (cache.phase_inputs) and set up
when the phase starts (Trainer._phase_inputs). Without random augmentation, what the frozen
part of the model computes from an image never changes, so it is computed once, in one
backbone pass for both phases:
- phase 1: the head alone, on the pooled backbone features;
- phase 2: the top (backbone layers from the cut up, pooling, head) on the activations at the
  cut below --fine_tune_at (model.cut), stored as float16.
Otherwise (--augment, --cache_features=off) the whole model trains on images decoded once
into memory, or streamed and decoded every epoch.
"""

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from trainer import cache
from trainer import checkpoints
from trainer import errors
from trainer import files
from trainer import model as model_lib
from trainer import pipelines
from trainer import sources
from trainer.errors import UserError


class Preempted(Exception):
    """SIGTERM (a preemption or a stopped job) or SIGINT (Ctrl-C) arrived; a checkpoint was
    saved at this step."""

    def __init__(self, step, signum):
        super().__init__(step)
        self.step = step
        self.signal = signal.Signals(signum).name


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str           # "head" (backbone frozen) or "fine_tune"
    first_epoch: int
    end_epoch: int      # exclusive
    learning_rate: float


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The run's quantities that follow from the config, the training set's size and the
    strategy: worked out once, for the job, the training loop and the plan alike."""
    global_batch: int
    replicas: int
    steps_per_epoch: int
    head: Phase       # phase 1: the new head, backbone frozen
    fine_tune: Phase  # phase 2: the top of the backbone too; no epochs with fine_tune_epochs=0

    @classmethod
    def of(cls, config, train_examples, replicas):
        if config.batch_size % replicas:
            raise UserError(f"--batch_size={config.batch_size} is global and must divide evenly "
                            f"over {replicas} replicas: use a multiple of {replicas}")
        if config.batch_size > train_examples:
            # Every step would pad its batch with repeats of the same few images, at the
            # memory cost of the whole batch.
            largest = train_examples // replicas * replicas
            raise UserError(f"--batch_size={config.batch_size} is larger than the "
                            f"{train_examples} training images: use at most {largest}")
        total = config.epochs + config.fine_tune_epochs
        return cls(config.batch_size, replicas,
                   pipelines.steps_per_epoch(train_examples, config.batch_size),
                   Phase("head", 0, config.epochs, config.learning_rate),
                   Phase("fine_tune", config.epochs, total, config.fine_tune_learning_rate))

    @property
    def per_replica_batch(self):
        return self.global_batch // self.replicas

    @property
    def phases(self):
        """The phases that have epochs to train, in order."""
        return [phase for phase in (self.head, self.fine_tune)
                if phase.end_epoch > phase.first_epoch]

    def end_step(self, phase):
        return phase.end_epoch * self.steps_per_epoch

    @property
    def total_steps(self):
        return self.end_step(self.fine_tune)


def itstime(step, every):
    """Whether a periodic action set to run every `every` steps (0: never) is due at `step`."""
    return bool(every) and step % every == 0


class Trainer:
    """Trains the classifier phase by phase. A context manager: leaving it, however, removes
    the feature files and scratch folders it made."""

    def __init__(self, config, strategy, schedule, execution, classifier, source,
                 checkpoint_dir, log_dir, chief):
        self.config = config
        self.strategy = strategy
        self.schedule = schedule
        self.execution = execution
        self.classifier = classifier
        self.source = source
        self.fine_tune_at = model_lib.fine_tune_layer(config.backbone, config.fine_tune_at)
        self.cut = cache.fine_tune_cut(config, classifier, self.fine_tune_at)
        self.inputs = cache.phase_inputs(config, self.cut)
        self.phase_seconds = {}  # wall time of each phase in this process, caching included
        self.cache_bytes_per_image = 0  # of what the backbone pass cached, all phases
        self.history = []        # one record per finished epoch, both phases
        self._sums = [0.0, 0.0, 0.0]  # loss, correct and count of the epoch so far
        self._stop_requested = None  # the signal that asked this process to stop
        self._multiworker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        self._store = cache.Store(config.memory_budget_mb * 2**20)
        self._decoded = None  # images decoded once, for the phases that read images
        self._cache = {}  # phase name: [train, validation] cached inputs, lists of arrays
        # (model, validation inputs) of the cached phase being trained, for the final report.
        self._validation = None
        self.class_weights = tf.constant(
            sources.class_weights(source.train, len(source.class_names)) if
            config.class_weight == "auto" else np.ones(len(source.class_names)), tf.float32)
        self.optimizers = self._build_optimizers()
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.state = tf.Variable("{}", dtype=tf.string, trainable=False)
        # Workers other than the chief save and export to a scratch folder they delete.
        self.scratch = None if chief else tempfile.mkdtemp(prefix="trainer-worker-")
        self.checkpoints = checkpoints.Checkpoints(tf.train.Checkpoint(
            model=classifier.model, step=self.step, state=self.state,
            random_state=model_lib.random_state(classifier.model),
            **{f"{name}_optimizer": optimizer for name, optimizer in self.optimizers.items()}),
            checkpoint_dir, checkpoint_dir if chief else self.scratch)
        self.writers = None
        if chief:
            self.writers = {split: tf.summary.create_file_writer(f"{log_dir}/{split}")
                            for split in ("train", "validation")}

    def _build_optimizers(self):
        """One optimizer per phase, built for that phase's trainable variables, so that both
        are in every checkpoint from the start."""
        optimizers = {}
        with self.strategy.scope():
            for phase in self.schedule.phases:
                optimizer = keras.optimizers.Adam(phase.learning_rate)
                if self.execution.policy == "mixed_float16":
                    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
                model_lib.set_phase(self.classifier, phase.name, self.fine_tune_at)
                optimizer.build(self.classifier.model.trainable_variables)
                optimizers[phase.name] = optimizer
        return optimizers

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.close()

    def close(self):
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
        self._store.close()

    # -- checkpoints (see checkpoints.py) -----------------------------------------------------

    def restore(self):
        """Restores the newest checkpoint that can be read (see checkpoints.py); returns the
        step it was taken at, or None when there is none."""
        if not self.checkpoints.restore():
            return None
        state = json.loads(self.state.numpy().decode())
        self.history = state.get("history", [])
        self._sums = state.get("sums", [0.0, 0.0, 0.0])
        return int(self.step.numpy())

    def _save(self):
        self.state.assign(json.dumps({"history": self.history, "sums": self._sums}))
        self.checkpoints.save(int(self.step.numpy()))

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, phase):
        """Trains `phase` from the current step to its end; nothing if it is done already.
        Returns the history of every epoch so far. Raises Preempted after saving a checkpoint
        if SIGTERM or Ctrl-C arrives on any worker.

        When storage fails transiently (reading data, writing a checkpoint), the phase goes on
        from the last checkpoint, as a rerun would, until failures have lasted
        --storage_retry_seconds; the data order follows from the step, so nothing is lost but
        the steps since that checkpoint."""
        if int(self.step.numpy()) >= self.schedule.end_step(phase):
            return self.history
        began = time.time()
        backoff = files.Backoff(self.config.storage_retry_seconds)
        with errors.from_tensorflow(self.config.data, self._multiworker), self._stop_on_signals():
            failed = False
            while True:
                try:
                    if failed:
                        self.restore()
                    self._fit_from_current_step(phase)
                    break
                except files.TRANSIENT as error:
                    if self._multiworker:
                        raise  # every worker must restart together: a one-line error
                    backoff.wait(error, f"training (phase {phase.name})")
                    failed = True
        self.phase_seconds[phase.name] = round(time.time() - began, 2)
        return self.history

    def _fit_from_current_step(self, phase):
        steps_per_epoch = self.schedule.steps_per_epoch
        first_step = max(int(self.step.numpy()), phase.first_epoch * steps_per_epoch)
        inputs, evaluate = self._phase_inputs(phase, first_step)
        iterator = iter(inputs)
        train_steps = self._train_function(phase)
        for epoch in range(first_step // steps_per_epoch, phase.end_epoch):
            self._run_epoch(phase, epoch, train_steps, iterator, evaluate)

    def _run_epoch(self, phase, epoch, train_steps, iterator, evaluate):
        """Trains the rest of one epoch, then validates, records and checkpoints it. Periodic
        actions are tests on the step reached: a step checkpoint, a stop asked for by a signal
        (checkpoint, then Preempted), a loss that is no longer finite (stop, keep the last good
        checkpoint)."""
        began = time.time()
        steps_per_epoch = self.schedule.steps_per_epoch
        epoch_end = (epoch + 1) * steps_per_epoch
        progress = _progress_bar(steps_per_epoch)
        step, stop = int(self.step.numpy()), False
        count_before = self._sums[2]  # images of this epoch trained before a resume
        while step < epoch_end:
            steps = self._chunk(step, epoch_end)
            *sums, stops = train_steps(iterator, tf.constant(steps),
                                       tf.constant(float(bool(self._stop_requested)))).numpy()
            step += steps
            if not math.isfinite(sums[0]):
                raise UserError(f"training loss became {sums[0]} by step {step} (epoch "
                                f"{epoch + 1}, phase {phase.name}); the last good checkpoint "
                                "was kept: lower the learning rate and run again")
            self._sums = [total + float(value) for total, value in zip(self._sums, sums)]
            self.step.assign(step)
            stop = stops > 0
            if self.writers and itstime(step, self.config.log_every_steps):
                with self.writers["train"].as_default(step=step):
                    tf.summary.scalar("step_loss", sums[0] / sums[2])
            if progress:
                progress.update(step - epoch * steps_per_epoch, self._running_metrics())
            if step < epoch_end and (stop or itstime(step, self.config.checkpoint_every_steps)):
                self._save()
            if stop and step < epoch_end:
                raise Preempted(step, self._stop_requested or signal.SIGTERM)
        self._end_epoch(phase, epoch, evaluate, time.time() - began,
                        self._sums[2] - count_before)
        if stop:
            raise Preempted(step, self._stop_requested or signal.SIGTERM)

    def _chunk(self, step, epoch_end):
        """Steps to run in the next call: up to steps_per_execution, never past the end of the
        epoch or the next step checkpoint."""
        end = epoch_end
        every = self.config.checkpoint_every_steps
        if every:
            end = min(end, (step // every + 1) * every)
        return min(self.execution.steps_per_execution, end - step)

    def _running_metrics(self):
        loss, correct, count = self._sums
        return [("loss", loss / count), ("accuracy", correct / count)]

    def _end_epoch(self, phase, epoch, evaluate, seconds, trained):
        """Validates, records and checkpoints an epoch. seconds: its training time in this
        process, validation apart, in which `trained` images went through training."""
        began = time.time()
        val_loss, val_accuracy = evaluate()
        loss, correct, count = self._sums
        record = {"epoch": epoch + 1, "phase": phase.name, "loss": loss / count,
                  "accuracy": correct / count, "val_loss": val_loss,
                  "val_accuracy": val_accuracy, "seconds": round(seconds, 3),
                  "images_per_second": round(trained / max(seconds, 1e-6), 1),
                  "val_seconds": round(time.time() - began, 3),
                  "learning_rate": phase.learning_rate}
        self.history.append(record)
        self._sums = [0.0, 0.0, 0.0]
        self._save()
        self._log_epoch(record)

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGTERM and a first Ctrl-C stop training at the next step, checkpointed; a second
        Ctrl-C stops at once (KeyboardInterrupt). Another worker's signal (stop > 0 from the
        all-reduce) reads as SIGTERM here."""
        previous = {signum: signal.signal(signum, self._request_stop)
                    for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _request_stop(self, signum, frame):
        del frame
        self._stop_requested = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _stop_between_batches(self):
        """Stops a long pass before training (caching features, decoding once) as soon as a
        signal asks; on one worker only, since the others would wait for it."""
        if self._stop_requested and not self._multiworker:
            self._save()
            raise Preempted(int(self.step.numpy()), self._stop_requested)

    def _log_epoch(self, record):
        print(f"epoch {record['epoch']}/{self.schedule.fine_tune.end_epoch} [{record['phase']}] "
              f"loss {record['loss']:.4f} accuracy {record['accuracy']:.4f} "
              f"val_loss {record['val_loss']:.4f} val_accuracy {record['val_accuracy']:.4f} "
              f"train {record['seconds']:.1f}s {record['images_per_second']:.0f} images/s, "
              f"validation {record['val_seconds']:.1f}s", flush=True)
        if self.writers:
            for split, prefix in (("train", ""), ("validation", "val_")):
                with self.writers[split].as_default(step=record["epoch"]):
                    tf.summary.scalar("epoch_loss", record[f"{prefix}loss"])
                    tf.summary.scalar("epoch_accuracy", record[f"{prefix}accuracy"])
                    if split == "train":
                        tf.summary.scalar("learning_rate", record["learning_rate"])
                        tf.summary.scalar("images_per_second", record["images_per_second"])
                self.writers[split].flush()

    # -- what a phase reads ------------------------------------------------------------------

    def _model(self, phase):
        """What a training step runs: the head, the top above the cut, or the whole model."""
        if not self.inputs[phase.name].cached:
            return self.classifier.model
        return self.classifier.head if phase.name == "head" else self.cut.top

    def _phase_inputs(self, phase, first_step):
        """(training batches from first_step to the end of the phase, a function validating
        the model): cached inputs, or images decoded once into memory, or images streamed
        and decoded every epoch."""
        end_step = self.schedule.end_step(phase)
        train, batch = self.source.train, self.schedule.global_batch
        order = pipelines.train_order(len(train), batch, self.config.seed, first_step, end_step)
        weights = pipelines.train_weights(len(train), batch, first_step, end_step)
        self._validation = None
        if self.inputs[phase.name].cached:
            train_inputs, validation_inputs = self._cached(phase)
            model = self._model(phase)
            self._validation = (model, validation_inputs)
            return (self._arrays(train_inputs, train, order, weights),
                    self._evaluation(model, validation_inputs))
        if self._decoded is None:
            self._decoded = self._decode_once() or ()
        if self._decoded:
            train_images, validation_images = self._decoded
            return (self._arrays(train_images, train, order, weights),
                    self._evaluation(self.classifier.model, validation_images))
        stream = self.strategy.distribute_datasets_from_function(
            lambda context: pipelines.training_pipeline(
                train, first_step, end_step, batch, self.config.image_size,
                self.config.seed, context, self.config.deterministic))
        return stream, self._evaluation(self.classifier.model)

    def _images(self, split, order, weights):
        batch, size = self.schedule.global_batch, self.config.image_size
        return self.strategy.distribute_datasets_from_function(
            lambda context: pipelines.pipeline(split, order, weights, batch, size, context))

    def _arrays(self, arrays, split, order, weights):
        batch = self.schedule.global_batch
        return self.strategy.distribute_datasets_from_function(
            lambda context: pipelines.array_pipeline(arrays, split.labels, order, weights,
                                                     batch, context))

    def _cached(self, phase):
        """[train, validation] cached inputs of `phase`, each a list of arrays with a row an
        example. The first call computes them together with those of the cached phase still
        to come: one backbone pass for both phases (the frozen part does not change in
        either)."""
        if phase.name in self._cache:
            if phase.name == "fine_tune":
                self._cache.pop("head", None)  # the backbone changes from here on
            return self._cache[phase.name]
        step = int(self.step.numpy())
        wanted = [later.name for later in self.schedule.phases
                  if self.inputs[later.name].cached and step < self.schedule.end_step(later)
                  and later.end_epoch >= phase.end_epoch]
        features = self.classifier.features
        outputs = {"head": [(features.output_shape[1:], np.float32)]}
        if self.cut:
            outputs["fine_tune"] = [(shape, np.float16) for shape in self.cut.shapes]
        if wanted == ["head"]:
            model = features
        else:  # the phase-1 features come out of the top of the same pass
            model = self.cut.bottom if wanted == ["fine_tune"] else self.cut.both
        began = time.time()
        splits = [self._outputs(lambda images: model(images, training=False),
                                [spec for name in wanted for spec in outputs[name]], split)
                  for split in (self.source.train, self.source.validation)]
        for name in wanted:
            count = len(outputs[name])
            self._cache[name] = [arrays[:count] for arrays in splits]
            splits = [arrays[count:] for arrays in splits]
        self._announce_cache(wanted, time.time() - began)
        return self._cache[phase.name]

    def _announce_cache(self, names, seconds):
        parts = {"head": ("backbone features", "the head trains on the features")}
        if self.cut:
            parts["fine_tune"] = (f"activations entering layer {self.cut.layer}",
                                  "phase fine_tune trains the top on the activations")
        what, who = zip(*(parts[name] for name in names))
        arrays = [array for name in names for split in self._cache[name] for array in split]
        size = sum(array.nbytes for array in arrays)
        self.cache_bytes_per_image = size // (len(self.source.train) + len(self.source.validation))
        on_disk = any(isinstance(array, np.memmap) for array in arrays)
        stored = ("; activations as " + ", ".join(sorted({array.dtype.name for array in
                                                         self._cache["fine_tune"][0]}))
                  if "fine_tune" in names else "")
        print(f"cached {' and '.join(what)} of "
              f"{len(self.source.train)} train and {len(self.source.validation)} validation "
              f"images in {seconds:.1f}s ({size / 2**20:.1f} MB, "
              f"{self.cache_bytes_per_image / 1024:.1f} KB an image{stored}"
              f"{', in files in the temp dir' if on_disk else ''}): "
              f"{'; '.join(who)} (--cache_features)", flush=True)

    def _decode_once(self):
        """Train and validation images decoded and resized once, when they fit within what is
        left of --memory_budget_mb, so that later epochs skip decoding; else None."""
        size = self.config.image_size
        count = len(self.source.train) + len(self.source.validation)
        if count * size * size * 3 * 4 > self._store.memory_left:
            return None
        began = time.time()
        decoded = [self._outputs(tf.identity, [((size, size, 3), np.float32)], split)[0]
                   for split in (self.source.train, self.source.validation)]
        print(f"decoded {count} images once in {time.time() - began:.1f}s "
              f"({count * size * size * 12 / 2**20:.0f} MB in memory): later epochs read "
              "them from there", flush=True)
        return [[array] for array in decoded]

    def _outputs(self, function, specs, split):
        """function(images), a tensor or a list of them, for every example of split: one pass
        under the strategy, each worker computing its share, gathered from all replicas so
        that every worker holds them all (each epoch's shuffle gives a worker other examples:
        the data order follows from the global step alone, for exact resume).
        specs: (shape, numpy dtype) of each output; a float16 one is stored as float32 from the
        first batch float16 would not hold (see cache.fits_float16). Returns a list of arrays,
        one row an example."""
        batch = self.schedule.global_batch
        order, weights = pipelines.evaluation_order(len(split), batch)
        iterator = iter(self._images(split, order, weights))

        @tf.function
        def compute(iterator):
            images, _, _ = next(iterator)
            per_replica = self.strategy.run(
                lambda x: [tf.cast(y, tf.float32) for y in model_lib.as_list(function(x))],
                args=(images,))
            return [self.strategy.gather(value, axis=0) for value in per_replica]

        results = [self._store.allocate((len(split), *shape), dtype) for shape, dtype in specs]
        for step in range(len(order) // batch):
            self._stop_between_batches()
            # Padding rows repeat the first examples and write the same values again.
            rows = order[step * batch:(step + 1) * batch]
            for index, values in enumerate(compute(iterator)):
                values = values.numpy()
                if results[index].dtype == np.float16 and not cache.fits_float16(values):
                    results[index] = self._store.copy(results[index], np.float32)
                results[index][rows] = values
        return results

    # -- steps -------------------------------------------------------------------------------

    def _train_function(self, phase):
        """A function running `steps` training steps; returns summed (loss, correct, count,
        stop), where stop > 0 if any worker was asked to stop. On cached inputs the steps run
        the head or the top alone: the same variables, loss and optimizer as the whole model."""
        model_lib.set_phase(self.classifier, phase.name, self.fine_tune_at)
        variables = self.classifier.model.trainable_variables
        model = self._model(phase)
        optimizer = self.optimizers[phase.name]
        global_batch = self.schedule.global_batch
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

    def _evaluation(self, model, arrays=None):
        """A function computing (loss, accuracy) over the validation split, each example once,
        from image files or from arrays of decoded images or cached inputs."""
        split = self.source.validation
        batch = self.schedule.global_batch
        order, weights = pipelines.evaluation_order(len(split), batch)
        dataset = (self._arrays(arrays, split, order, weights) if arrays is not None
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
            for _ in range(len(order) // batch):
                totals += [float(value) for value in eval_step(iterator)]
            return totals[0] / totals[2], totals[1] / totals[2]

        return evaluate

    # -- after training ----------------------------------------------------------------------

    def predict_validation(self):
        """Class probabilities of every validation example: from the cached inputs when the
        run ended in a cached phase, else one pass over the images."""
        if self._validation is not None:
            model, arrays = self._validation
            batch = self.schedule.global_batch  # the activations of a batch through the top
            logits = np.concatenate([
                model(model_lib.unlist([array[start:start + batch].astype(np.float32, copy=False)
                                        for array in arrays]), training=False)
                for start in range(0, len(arrays[0]), batch)])
            return tf.nn.softmax(tf.cast(logits, tf.float32)).numpy()
        inference = self.classifier.inference
        with errors.from_tensorflow(self.config.data, self._multiworker):
            [logits] = self._outputs(lambda images: inference(images, training=False),
                                     [(inference.output_shape[1:], np.float32)],
                                     self.source.validation)
        return tf.nn.softmax(logits).numpy()


def _sums(labels, logits, per_example, weights):
    correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels),
                      tf.float32)
    return (tf.reduce_sum(per_example * weights), tf.reduce_sum(correct * weights),
            tf.reduce_sum(weights))


def _progress_bar(steps):
    """Keras's progress bar on a terminal; on Vertex logs one line per epoch is enough."""
    return keras.utils.Progbar(steps) if sys.stdout.isatty() else None
