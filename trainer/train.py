"""The training loop: phases, epochs, chunks of steps, checkpoints and signals.

Our own step under strategy.run (steps.py), checkpointed with tf.train.Checkpoint. Not Keras
fit + BackupAndRestore: fit fails under MultiWorkerMirroredStrategy with 2+ workers in Keras
3.15, and BackupAndRestore restarts an interrupted epoch from its first batch. Here a
checkpoint holds the model, both phases' optimizers, the global step and the run's record; the
data position follows from the step (pipelines.py), so a resumed run continues at the exact
batch where the last checkpoint was taken.

The loop owns the step, the checkpoints and the stop signals. What a phase trains on is
phase_data.py's, the heads of --head_sweep sweep.py's, the epoch records and their lines and
summaries run_record.py's, the compiled step and evaluation steps.py's: the loop asks them
and holds none of their state.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from trainer import checkpoints
from trainer import errors
from trainer import files
from trainer import model as model_lib
from trainer import pipelines
from trainer import progress
from trainer import run_record
from trainer import sources
from trainer import steps
from trainer import sweep
from trainer.errors import Stopped, UserError
from trainer.run_record import itstime


class StopSignals:
    """SIGTERM and a first Ctrl-C ask the job to stop at its next step or batch, where it can
    keep its work; a second Ctrl-C stops at once (KeyboardInterrupt). Another worker's signal
    (stop > 0 from the all-reduce of a training step) reads as SIGTERM."""

    def __init__(self):
        self.requested = None  # the signal that asked this process to stop

    @contextlib.contextmanager
    def caught(self):
        previous = {signum: signal.signal(signum, self._request)
                    for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _request(self, signum, frame):
        del frame
        self.requested = signum
        again = ""
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            again = "; Ctrl-C again to stop at once"
        # os.write: print() from a handler could re-enter a write the job was making.
        os.write(2, f"{signal.Signals(signum).name}: stopping at the next step or batch, "
                    f"keeping the work done{again}\n".encode())

    def between_batches(self, multiworker):
        """Stops a pass before training as soon as a signal asks (what it finished is kept);
        on one worker only, since the others would wait for it in the pass's gathers."""
        if self.requested and not multiworker:
            raise Stopped(None, self.requested)


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

    def phase_at(self, step):
        """The phase that trains from global step `step` on; the last one once all are done."""
        return next((phase for phase in self.phases if step < self.end_step(phase)),
                    self.phases[-1])

    @property
    def total_steps(self):
        return self.end_step(self.fine_tune)


def starting_phase(schedule, checkpoint_dir):
    """The name of the phase a job trains first: where its newest checkpoint's step (from the
    file's name) falls in `schedule`. Before the pass over the images, whose bad ones may still
    shorten the epochs, so only a hint of what to read first (see PhaseData.for_phase)."""
    return schedule.phase_at(checkpoints.newest_step(checkpoint_dir) or 0).name


class Trainer:
    """Trains the classifier phase by phase. A context manager: leaving it, however, removes
    the scratch folder a worker other than the chief saves to."""

    def __init__(self, config, strategy, schedule, execution, classifier, data, stop,
                 checkpoint_dir, log_dir, chief):
        self.config = config
        self.strategy = strategy
        self.schedule = schedule
        self.execution = execution
        self.classifier = classifier
        self.data = data  # phase_data.PhaseData
        self.source = source = data.source
        self.chief = chief
        self.fine_tune_at = model_lib.fine_tune_layer(config.backbone, config.fine_tune_at)
        self.phase_seconds = {}  # wall time of each phase in this process
        self.stop = stop  # StopSignals
        self._multiworker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        self.class_weights = tf.constant(
            sources.class_weights(source.train, len(source.class_names)) if
            config.class_weight == "auto" else np.ones(len(source.class_names)), tf.float32)
        self.heads = sweep.Heads(config.head_settings(), classifier.head, strategy)
        self.optimizers = self._build_optimizers()
        self.heads.build_optimizers(self._optimizer)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.state = tf.Variable("{}", dtype=tf.string, trainable=False)
        # Workers other than the chief save and export to a scratch folder they delete.
        self.scratch = None if chief else tempfile.mkdtemp(prefix="trainer-worker-")
        self.checkpoints = checkpoints.Checkpoints(tf.train.Checkpoint(
            model=classifier.model, step=self.step, state=self.state,
            random_state=model_lib.random_state(classifier.model), **self.heads.checkpointed(),
            **{f"{name}_optimizer": optimizer for name, optimizer in self.optimizers.items()}),
            checkpoint_dir, checkpoint_dir if chief else self.scratch)
        self.record = run_record.RunRecord(len(self.heads.settings),
                                           log_dir if chief else None,
                                           schedule.fine_tune.end_epoch)

    # What the job reports of the run (task.py, metrics.json).
    history = property(lambda self: self.record.history)
    head_histories = property(lambda self: self.record.head_histories)
    head_settings = property(lambda self: self.heads.settings)
    chosen = property(lambda self: self.heads.chosen)

    def _build_optimizers(self):
        """One optimizer per phase, built for that phase's trainable variables, so that both
        are in every checkpoint from the start."""
        optimizers = {}
        for phase in self.schedule.phases:
            model_lib.set_phase(self.classifier, phase.name, self.fine_tune_at)
            optimizers[phase.name] = self._optimizer(self.heads.learning_rates(phase)[0],
                                                     self.classifier.model.trainable_variables)
        return optimizers

    def _optimizer(self, learning_rate, variables):
        with self.strategy.scope():
            optimizer = keras.optimizers.Adam(learning_rate)
            if self.execution.policy == "mixed_float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(variables)
        return optimizer

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.close()

    def close(self):
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    # -- checkpoints (see checkpoints.py) -----------------------------------------------------

    def restore(self):
        """Restores the newest checkpoint that can be read (see checkpoints.py); returns the
        step it was taken at, or None when there is none."""
        if not self.checkpoints.restore():
            return None
        state = json.loads(self.state.numpy().decode())
        self.record.load(state)
        if state.get("chosen") is not None and self.heads.chosen is None:
            self.heads.take(state["chosen"], copy_weights=False)  # the checkpoint has them
        return int(self.step.numpy())

    def _save(self):
        self.state.assign(json.dumps({**self.record.state(), "chosen": self.heads.chosen}))
        self.checkpoints.save(int(self.step.numpy()))

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, phase):
        """Trains `phase` from the current step to its end; nothing if it is done already.
        Returns the history of every epoch so far. Raises Stopped after saving a checkpoint
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
        with errors.from_tensorflow(self.config.data, self._multiworker), self.stop.caught():
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
        if phase.name != "head" or self.heads.chosen is not None:
            return
        chosen = sweep.choose(self.record.head_histories)
        self.heads.take(chosen, copy_weights=True)
        self.record.adopt(chosen)
        print(sweep.table(self.heads.settings, self.record.head_histories, chosen), flush=True)
        self._save()

    def _fit_from_current_step(self, phase):
        steps_per_epoch = self.schedule.steps_per_epoch
        first_step = max(int(self.step.numpy()), phase.first_epoch * steps_per_epoch)
        inputs, (validation, validation_steps) = self.data.for_phase(
            phase, first_step, self.schedule.end_step(phase))
        learners = self._learners(phase)
        evaluate = steps.evaluation(self.strategy, [learner.model for learner in learners],
                                    validation, validation_steps)
        iterator = iter(inputs)
        train_steps = steps.train_function(self.strategy, learners, self.schedule.global_batch,
                                           self.class_weights, self.execution.jit_compile)
        for epoch in range(first_step // steps_per_epoch, phase.end_epoch):
            self._run_epoch(phase, epoch, train_steps, iterator, evaluate)

    def _learners(self, phase):
        """The classifier's learner, on what `phase` trains on, and the other heads' while
        sweeping."""
        model_lib.set_phase(self.classifier, phase.name, self.fine_tune_at)
        return self.heads.learners(phase, steps.Learner(
            self.data.model(phase), self.classifier.model.trainable_variables,
            self.optimizers[phase.name], self.heads.label_smoothing))

    def _run_epoch(self, phase, epoch, train_steps, iterator, evaluate):
        """Trains the rest of one epoch, then validates, records and checkpoints it. Periodic
        actions are tests on the step reached: a step checkpoint, a stop asked for by a signal
        (checkpoint, then Stopped), a loss that is no longer finite (stop, keep the last good
        checkpoint)."""
        began = time.time()
        steps_per_epoch = self.schedule.steps_per_epoch
        epoch_end = (epoch + 1) * steps_per_epoch
        progress = _progress_bar(steps_per_epoch)
        step, stop = int(self.step.numpy()), False
        trained_models = len(self.heads.models) if self.heads.sweeping(phase) else 1
        count_before = self.record.start_epoch(trained_models)
        while step < epoch_end:
            chunk = self._chunk(step, epoch_end)
            sums, stops = train_steps(iterator, tf.constant(chunk),
                                      tf.constant(float(bool(self.stop.requested))))
            sums = sums.numpy().astype(np.float64)
            step += chunk
            if not np.isfinite(sums[:, 0]).any():
                kept = ("the last good checkpoint was kept" if self.checkpoints.latest else
                        "no checkpoint had been written yet")
                raise UserError(f"training loss became {sums[0, 0]} by step {step} (epoch "
                                f"{epoch + 1}, phase {phase.name}); {kept}: lower the learning "
                                "rate and run again")
            self.record.add(step, sums, self.config.log_every_steps)
            self.step.assign(step)
            stop = float(stops) > 0
            if progress:
                progress.update(step - epoch * steps_per_epoch, self.record.running_metrics())
            if step < epoch_end and (stop or itstime(step, self.config.checkpoint_every_steps)):
                self._save()
            if stop and step < epoch_end:
                raise Stopped(step, self.stop.requested or signal.SIGTERM)
        self._end_epoch(phase, epoch, evaluate, time.time() - began,
                        self.record.sums[0, 2] - count_before)
        if stop:
            raise Stopped(step, self.stop.requested or signal.SIGTERM)

    def _chunk(self, step, epoch_end):
        """Steps to run in the next call: up to steps_per_execution, never past the end of the
        epoch or the next step checkpoint."""
        end = epoch_end
        every = self.config.checkpoint_every_steps
        if every:
            end = min(end, (step // every + 1) * every)
        return min(self.execution.steps_per_execution, end - step)

    def _end_epoch(self, phase, epoch, evaluate, seconds, trained):
        """Validates, records and checkpoints an epoch. seconds: its training time in this
        process, validation apart, in which `trained` images went through training."""
        began = time.time()
        validation = evaluate()
        sweeping = self.heads.sweeping(phase)
        records = self.record.end_epoch(phase, epoch, validation,
                                        self.heads.learning_rates(phase), seconds,
                                        round(time.time() - began, 3), trained, sweeping)
        self._save()
        self.record.log_epoch(records, sweeping, self.heads.settings)

    # -- after training ----------------------------------------------------------------------

    def predict_validation(self):
        """Class probabilities of every validation example (see PhaseData)."""
        return self.data.predict_validation(self.schedule.phases[-1])


def _progress_bar(steps_per_epoch):
    """Keras's progress bar on a terminal or in a notebook; on Vertex logs one line per epoch is
    enough."""
    return keras.utils.Progbar(steps_per_epoch) if progress.interactive() else None
