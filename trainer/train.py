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
import shutil
import signal
import sys
import tempfile
import time

from absl import logging
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
from trainer import sweep
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
        self.chief = chief
        self.fine_tune_at = model_lib.fine_tune_layer(config.backbone, config.fine_tune_at)
        self.cut = cache.fine_tune_cut(config, classifier, self.fine_tune_at)
        self.inputs = cache.phase_inputs(config, self.cut)
        self.phase_seconds = {}  # wall time of each phase in this process, caching included
        self.cache_bytes_per_image = 0  # of what the backbone pass cached, all phases
        self.history = []        # one record per finished epoch, both phases
        # Loss, correct and count of the epoch so far, a row per model trained (None: zero).
        self._sums = None
        self._stop_requested = None  # the signal that asked this process to stop
        self._multiworker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        self._store = cache.Store(config.memory_budget_mb * 2**20)
        self._decoded = None  # images decoded once, for the phases that read images
        self._cache = {}  # phase name: [train, validation] cached inputs, lists of arrays
        self.shared = cache.SharedCache(config.feature_cache) if config.feature_cache else None
        self._common_key = None  # the job-wide part of a --feature_cache key, once needed
        self._versions = {}  # --feature_cache entry: the version a publish is conditional on
        # (model, validation inputs) of the cached phase being trained, for the final report.
        self._validation = None
        self.class_weights = tf.constant(
            sources.class_weights(source.train, len(source.class_names)) if
            config.class_weight == "auto" else np.ones(len(source.class_names)), tf.float32)
        # The phase-1 settings of each head, a point of --head_sweep's grid each (else one):
        # the first is the classifier's own head, the others copies of it (see sweep.py).
        self.head_settings = config.head_settings()
        self.chosen = 0 if len(self.head_settings) == 1 else None  # the head phase 2 takes
        self.head_histories = [[] for _ in self.head_settings]
        self.label_smoothing = self.head_settings[0]["label_smoothing"]
        with strategy.scope():
            self.heads = [classifier.head] + [model_lib.copy_head(classifier.head)
                                              for _ in self.head_settings[1:]]
        for head, point in zip(self.heads, self.head_settings):
            model_lib.set_dropout(head, point["dropout"])
        self.optimizers = self._build_optimizers()
        # Those of the other heads; the classifier's own head has self.optimizers["head"].
        self.sweep_optimizers = [self._optimizer(point["learning_rate"], head.trainable_variables)
                                 for head, point in zip(self.heads[1:], self.head_settings[1:])]
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.state = tf.Variable("{}", dtype=tf.string, trainable=False)
        # Workers other than the chief save and export to a scratch folder they delete.
        self.scratch = None if chief else tempfile.mkdtemp(prefix="trainer-worker-")
        self.checkpoints = checkpoints.Checkpoints(tf.train.Checkpoint(
            model=classifier.model, step=self.step, state=self.state,
            random_state=model_lib.random_state(classifier.model),
            sweep_heads=self.heads[1:], sweep_optimizers=self.sweep_optimizers,
            sweep_random_state=[variable for head in self.heads[1:]
                                for variable in model_lib.random_state(head)],
            **{f"{name}_optimizer": optimizer for name, optimizer in self.optimizers.items()}),
            checkpoint_dir, checkpoint_dir if chief else self.scratch)
        self.log_dir = log_dir
        self.writers = self._writers(log_dir) if chief else None
        self._head_writers = {}  # a head of --head_sweep's name: its writers

    def _writers(self, log_dir):
        return {split: tf.summary.create_file_writer(f"{log_dir}/{split}")
                for split in ("train", "validation")}

    def _build_optimizers(self):
        """One optimizer per phase, built for that phase's trainable variables, so that both
        are in every checkpoint from the start."""
        optimizers = {}
        for phase in self.schedule.phases:
            model_lib.set_phase(self.classifier, phase.name, self.fine_tune_at)
            optimizers[phase.name] = self._optimizer(self._learning_rates(phase)[0],
                                                     self.classifier.model.trainable_variables)
        return optimizers

    def _optimizer(self, learning_rate, variables):
        with self.strategy.scope():
            optimizer = keras.optimizers.Adam(learning_rate)
            if self.execution.policy == "mixed_float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(variables)
        return optimizer

    def _learning_rates(self, phase):
        """The learning rate of each model `phase` trains."""
        if phase.name == "head":
            return [point["learning_rate"] for point in self.head_settings]
        return [phase.learning_rate]

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
        sums = state.get("sums")
        self._sums = None if sums is None else np.reshape(sums, (-1, 3))
        self.head_histories = state.get("head_histories", self.head_histories)
        if state.get("chosen") is not None and self.chosen is None:
            self._take_head(state["chosen"], copy_weights=False)  # the checkpoint has them
        return int(self.step.numpy())

    def _save(self):
        self.state.assign(json.dumps({
            "history": self.history, "sums": None if self._sums is None else self._sums.tolist(),
            "head_histories": self.head_histories, "chosen": self.chosen}))
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
            self._end_phase(phase)
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
        self._end_phase(phase)
        self.phase_seconds[phase.name] = round(time.time() - began, 2)
        return self.history

    def _end_phase(self, phase):
        """After phase 1 of --head_sweep: the best head becomes the classifier's, and the run
        goes on with its settings and its curve (a rerun finds the choice checkpointed)."""
        if phase.name != "head" or self.chosen is not None:
            return
        chosen = sweep.choose(self.head_histories)
        self._take_head(chosen, copy_weights=True)
        self.history = self.head_histories[chosen] + self.history
        print(sweep.table(self.head_settings, self.head_histories, chosen), flush=True)
        if self.writers:
            for record in self.head_histories[chosen]:
                self._summarise(record, self.writers)
        self._save()

    def _take_head(self, index, copy_weights):
        if copy_weights and index:
            for target, source in zip(self.classifier.head.variables, self.heads[index].variables):
                target.assign(source)
        point = self.head_settings[index]
        model_lib.set_dropout(self.classifier.head, point["dropout"])
        self.label_smoothing = point["label_smoothing"]
        self.chosen = index

    def _sweeping(self, phase):
        """Whether `phase` trains the heads of --head_sweep side by side."""
        return phase.name == "head" and self.chosen is None

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
        if self._sums is None:
            self._sums = np.zeros((len(self._models(phase)), 3))
        count_before = self._sums[0, 2]  # images of this epoch trained before a resume
        while step < epoch_end:
            steps = self._chunk(step, epoch_end)
            sums, stops = train_steps(iterator, tf.constant(steps),
                                      tf.constant(float(bool(self._stop_requested))))
            sums = sums.numpy().astype(np.float64)
            step += steps
            if not np.isfinite(sums[:, 0]).any():
                raise UserError(f"training loss became {sums[0, 0]} by step {step} (epoch "
                                f"{epoch + 1}, phase {phase.name}); the last good checkpoint "
                                "was kept: lower the learning rate and run again")
            self._sums = self._sums + sums
            self.step.assign(step)
            stop = float(stops) > 0
            if self.writers and len(sums) == 1 and itstime(step, self.config.log_every_steps):
                with self.writers["train"].as_default(step=step):
                    tf.summary.scalar("step_loss", sums[0, 0] / sums[0, 2])
            if progress:
                progress.update(step - epoch * steps_per_epoch, self._running_metrics())
            if step < epoch_end and (stop or itstime(step, self.config.checkpoint_every_steps)):
                self._save()
            if stop and step < epoch_end:
                raise Preempted(step, self._stop_requested or signal.SIGTERM)
        self._end_epoch(phase, epoch, evaluate, time.time() - began,
                        self._sums[0, 2] - count_before)
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
        loss, correct, count = self._sums[0]
        return [("loss", loss / count), ("accuracy", correct / count)]

    def _end_epoch(self, phase, epoch, evaluate, seconds, trained):
        """Validates, records and checkpoints an epoch. seconds: its training time in this
        process, validation apart, in which `trained` images went through training."""
        began = time.time()
        validation = evaluate()
        val_seconds = round(time.time() - began, 3)
        records = [{"epoch": epoch + 1, "phase": phase.name, "loss": loss / count,
                    "accuracy": correct / count, "val_loss": val_loss,
                    "val_accuracy": val_accuracy, "seconds": round(seconds, 3),
                    "images_per_second": round(trained / max(seconds, 1e-6), 1),
                    "val_seconds": val_seconds, "learning_rate": learning_rate}
                   for (loss, correct, count), (val_loss, val_accuracy), learning_rate
                   in zip(self._sums.tolist(), validation, self._learning_rates(phase))]
        if self._sweeping(phase):
            for history, record in zip(self.head_histories, records):
                history.append(record)
        else:
            self.history.append(records[0])
        self._sums = None
        self._save()
        self._log_epoch(records, phase)

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

    def _log_epoch(self, records, phase):
        """The epoch's line, and its TensorBoard scalars: under the run's train/ and
        validation/, or, for the heads of --head_sweep, under head_sweep/<head>/."""
        record = records[0]
        sweeping, names = self._sweeping(phase), sweep.varied(self.head_settings)
        if sweeping:
            best = sweep.choose([[each] for each in records])
            figures = (f"{len(records)} heads, best val_accuracy "
                       f"{records[best]['val_accuracy']:.4f} "
                       f"({sweep.label(self.head_settings[best], names)})")
        else:
            figures = (f"loss {record['loss']:.4f} accuracy {record['accuracy']:.4f} "
                       f"val_loss {record['val_loss']:.4f} "
                       f"val_accuracy {record['val_accuracy']:.4f}")
        print(f"epoch {record['epoch']}/{self.schedule.fine_tune.end_epoch} [{record['phase']}] "
              f"{figures} train {record['seconds']:.1f}s {record['images_per_second']:.0f} "
              f"images/s, validation {record['val_seconds']:.1f}s", flush=True)
        if not self.writers:
            return
        if not sweeping:
            self._summarise(record, self.writers)
            return
        for point, each in zip(self.head_settings, records):
            folder = sweep.label(point, names).replace(", ", ",")
            if folder not in self._head_writers:
                self._head_writers[folder] = self._writers(f"{self.log_dir}/head_sweep/{folder}")
            self._summarise(each, self._head_writers[folder])

    def _summarise(self, record, writers):
        for split, prefix in (("train", ""), ("validation", "val_")):
            with writers[split].as_default(step=record["epoch"]):
                tf.summary.scalar("epoch_loss", record[f"{prefix}loss"])
                tf.summary.scalar("epoch_accuracy", record[f"{prefix}accuracy"])
                if split == "train":
                    tf.summary.scalar("learning_rate", record["learning_rate"])
                    tf.summary.scalar("images_per_second", record["images_per_second"])
            writers[split].flush()

    # -- what a phase reads ------------------------------------------------------------------

    def _model(self, phase):
        """What a training step runs: the head, the top above the cut, or the whole model."""
        if not self.inputs[phase.name].cached:
            return self.classifier.model
        return self.classifier.head if phase.name == "head" else self.cut.top

    def _models(self, phase):
        """The models a training step trains: every head of --head_sweep, else one."""
        return [self._model(phase)] + (self.heads[1:] if self._sweeping(phase) else [])

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
                    self._evaluation(self._models(phase), validation_inputs))
        if self._decoded is None:
            self._decoded = self._decode_once() or ()
        if self._decoded:
            train_images, validation_images = self._decoded
            return (self._arrays(train_images, train, order, weights),
                    self._evaluation([self.classifier.model], validation_images))
        stream = self.strategy.distribute_datasets_from_function(
            lambda context: pipelines.training_pipeline(
                train, first_step, end_step, batch, self.config.image_size,
                self.config.seed, context, self.config.deterministic))
        return stream, self._evaluation([self.classifier.model])

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
        either). With --feature_cache, what is found there is read instead, and what is
        computed is published there for later jobs."""
        if phase.name in self._cache:
            if phase.name == "fine_tune":
                self._cache.pop("head", None)  # the backbone changes from here on
            return self._cache[phase.name]
        step = int(self.step.numpy())
        wanted = [later.name for later in self.schedule.phases
                  if self.inputs[later.name].cached and step < self.schedule.end_step(later)
                  and later.end_epoch >= phase.end_epoch]
        keys = {name: self._entry_key(name) for name in wanted} if self.shared else {}
        began = time.time()
        found = self._read_shared(keys)
        missing = self._everywhere([name for name in wanted if name not in found])
        read = [name for name in wanted if name not in missing]
        self._cache.update({name: found[name] for name in read})
        if read:
            self._announce_cache(read, time.time() - began, self.shared.folder)
        if missing:
            self._compute_cache(missing)
            if self.chief:
                self._publish_shared({name: keys[name] for name in missing if name in keys})
        return self._cache[phase.name]

    def _compute_cache(self, names):
        """The backbone pass: what phases `names` train on, into self._cache."""
        features = self.classifier.features
        outputs = {"head": [(features.output_shape[1:], np.float32)]}
        if self.cut:
            outputs["fine_tune"] = [(shape, np.float16) for shape in self.cut.shapes]
        if names == ["head"]:
            model = features
        else:  # the phase-1 features come out of the top of the same pass
            model = self.cut.bottom if names == ["fine_tune"] else self.cut.both
        began = time.time()
        splits = [self._outputs(lambda images: model(images, training=False),
                                [spec for name in names for spec in outputs[name]], split)
                  for split in (self.source.train, self.source.validation)]
        for name in names:
            count = len(outputs[name])
            self._cache[name] = [arrays[:count] for arrays in splits]
            splits = [arrays[count:] for arrays in splits]
        self._announce_cache(names, time.time() - began)

    # -- --feature_cache (see cache.SharedCache) ---------------------------------------------

    def _entry_key(self, name):
        if self._common_key is None:
            self._common_key = cache.common_key(self.config, self.execution.policy, self.source)
        computing = self.classifier.features if name == "head" else self.cut.bottom
        return cache.entry_key(self._common_key, name, computing, self.cut)

    def _read_shared(self, keys):
        """{phase name: [train, validation] arrays} of the entries found whole for `keys`; a
        damaged one is reported and left to be computed again."""
        found = {}
        for name, key in keys.items():
            entry = cache.entry_name(key)
            try:
                content, self._versions[entry] = self.shared.read(entry)
                if content is None:
                    continue
                found[name] = [[self._store.copy(array, array.dtype) for array in arrays]
                               for arrays in cache.decode(content, key)]
            except cache.Damaged as damaged:
                logging.warning("feature cache entry %s is damaged (%s): computing it again",
                                self.shared.path(entry), damaged)
            except self.shared.transient as error:
                logging.warning("could not read the feature cache entry %s (%s): computing it",
                                self.shared.path(entry), errors.first_line(error))
        return found

    def _publish_shared(self, keys):
        for name, key in keys.items():
            entry = cache.entry_name(key)
            try:
                published = self.shared.publish(entry, cache.encode(key, self._cache[name]),
                                                 self._versions.get(entry))
            except self.shared.transient as error:
                logging.warning("could not write the feature cache entry %s (%s): later jobs "
                                "compute it again", self.shared.path(entry),
                                errors.first_line(error))
                continue
            print(f"{'kept' if published else 'another job kept'} {cache.describe(key)} in "
                  f"{self.shared.path(entry)} for later jobs with the same key", flush=True)

    def _everywhere(self, names):
        """Of `names`, those missing on any worker: every worker must run the backbone pass
        together (its gathers are collective), so one that misses an entry makes all run."""
        if not self._multiworker:
            return names
        phases = ("head", "fine_tune")
        flags = tf.constant([float(name in names) for name in phases])
        total = self.strategy.reduce(tf.distribute.ReduceOp.SUM,
                                     self.strategy.run(tf.function(lambda: tf.identity(flags))),
                                     axis=None)
        return [name for name, count in zip(phases, total.numpy()) if count > 0]

    def _announce_cache(self, names, seconds, shared_folder=None):
        """What phases `names` train on was computed in `seconds`, or read from
        --feature_cache's shared_folder."""
        parts = {"head": ("backbone features", "the head trains on the features")}
        if self.cut:
            parts["fine_tune"] = (f"activations entering layer {self.cut.layer}",
                                  "phase fine_tune trains the top on the activations")
        what, who = zip(*(parts[name] for name in names))
        arrays = [array for name in names for split in self._cache[name] for array in split]
        size = sum(array.nbytes for array in arrays)
        images = len(self.source.train) + len(self.source.validation)
        self.cache_bytes_per_image = sum(array.nbytes for splits in self._cache.values()
                                         for split in splits for array in split) // images
        on_disk = any(isinstance(array, np.memmap) for array in arrays)
        stored = ("; activations as " + ", ".join(sorted({array.dtype.name for array in
                                                         self._cache["fine_tune"][0]}))
                  if "fine_tune" in names else "")
        images_line = (f"{' and '.join(what)} of {len(self.source.train)} train and "
                       f"{len(self.source.validation)} validation images")
        done = (f"read {images_line} from --feature_cache {shared_folder} in {seconds:.1f}s, "
                "no backbone pass" if shared_folder else f"cached {images_line} in {seconds:.1f}s")
        print(f"{done} ({size / 2**20:.1f} MB, {size / images / 1024:.1f} KB an image{stored}"
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

    def _learners(self, phase):
        """(model, variables, optimizer, label smoothing) of each model a training step trains.
        On cached inputs the step runs the head or the top alone: the same variables, loss and
        optimizer as the whole model."""
        model_lib.set_phase(self.classifier, phase.name, self.fine_tune_at)
        first = (self._model(phase), self.classifier.model.trainable_variables,
                 self.optimizers[phase.name], self.label_smoothing)
        if not self._sweeping(phase):
            return [first]
        return [first] + [(head, head.trainable_variables, optimizer, point["label_smoothing"])
                          for head, optimizer, point in zip(self.heads[1:],
                                                            self.sweep_optimizers,
                                                            self.head_settings[1:])]

    def _train_function(self, phase):
        """A function running `steps` training steps; returns the summed (loss, correct,
        count) of each model trained, and stop > 0 if any worker was asked to stop."""
        learners = self._learners(phase)
        global_batch = self.schedule.global_batch
        class_weights = self.class_weights

        def replica_step(inputs, labels, weights, stop):
            sums = []
            for model, variables, optimizer, smoothing in learners:
                with tf.GradientTape() as tape:
                    logits = model(inputs, training=True)
                    per_example = _loss(labels, logits, smoothing)
                    loss_weights = weights * tf.gather(class_weights, labels)
                    loss = tf.reduce_sum(per_example * loss_weights) / global_batch
                    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                        loss = optimizer.scale_loss(loss)
                gradients = tape.gradient(loss, variables)
                optimizer.apply_gradients(zip(gradients, variables))
                sums.append(tf.stack(_sums(labels, logits, per_example, weights)))
            # Every worker learns at this same step whether any of them was told to stop.
            stop_anywhere = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, tf.identity(stop))
            return tf.stack(sums), stop_anywhere

        if self.execution.jit_compile:
            replica_step = tf.function(replica_step, jit_compile=True)

        @tf.function
        def train_steps(iterator, steps, stop):
            totals, stops = tf.zeros([len(learners), 3]), tf.zeros([])
            for _ in tf.range(steps):
                sums, stop_anywhere = self._reduce(
                    self.strategy.run(replica_step, args=next(iterator) + (stop,)))
                totals += sums
                stops += stop_anywhere
            return totals, stops

        return train_steps

    def _reduce(self, per_replica):
        return [self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                for value in per_replica]

    def _evaluation(self, models, arrays=None):
        """A function computing the (loss, accuracy) of each model over the validation split,
        each example once, from image files or from arrays of decoded images or cached
        inputs. The loss is the plain cross-entropy, whatever the label smoothing."""
        split = self.source.validation
        batch = self.schedule.global_batch
        order, weights = pipelines.evaluation_order(len(split), batch)
        dataset = (self._arrays(arrays, split, order, weights) if arrays is not None
                   else self._images(split, order, weights))

        def replica_step(inputs, labels, weights):
            return tf.stack([tf.stack(_sums(labels, logits, _loss(labels, logits), weights))
                             for logits in (model(inputs, training=False) for model in models)])

        @tf.function
        def eval_step(iterator):
            return self.strategy.reduce(tf.distribute.ReduceOp.SUM,
                                        self.strategy.run(replica_step, args=next(iterator)),
                                        axis=None)

        def evaluate():
            iterator = iter(dataset)
            totals = np.zeros((len(models), 3))
            for _ in range(len(order) // batch):
                totals += eval_step(iterator).numpy()
            return [(loss / count, correct / count) for loss, correct, count in totals.tolist()]

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


def _loss(labels, logits, label_smoothing=0.0):
    """Cross-entropy of each example; with label smoothing, against targets of
    1 - smoothing + smoothing / classes for the label, smoothing / classes elsewhere."""
    if not label_smoothing:
        return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    targets = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
    return keras.losses.categorical_crossentropy(targets, logits, from_logits=True,
                                                 label_smoothing=label_smoothing)


def _sums(labels, logits, per_example, weights):
    correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels),
                      tf.float32)
    return (tf.reduce_sum(per_example * weights), tf.reduce_sum(correct * weights),
            tf.reduce_sum(weights))


def _progress_bar(steps):
    """Keras's progress bar on a terminal; on Vertex logs one line per epoch is enough."""
    return keras.utils.Progbar(steps) if sys.stdout.isatty() else None
