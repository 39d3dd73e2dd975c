"""What each phase trains and validates on, and where it comes from.

Decided before training (phase_inputs: shown by --dry_run and the log) and set up when a phase
starts (PhaseData.for_phase). Without random augmentation, what the frozen part of the model
computes from an image never changes, so it is computed once, in one backbone pass for both
phases:
- phase 1 (head): the head alone trains on the pooled backbone features;
- phase 2 (fine_tune): the top (backbone layers from the cut up, the pooling and the head)
  trains on the activations at the cut below --fine_tune_at (model.cut), stored as float16.
The pass that computes them, kept in chunks for resume and for later jobs, is caching.py's.
Otherwise (--augment, --cache_features=off) the whole model trains on images decoded once into
memory, or streamed and decoded every epoch.

It holds what the pass gave and makes the tf.data pipelines over it or over the images. It
trains nothing, and it checkpoints nothing: the loop (train.py) calls it.
"""

import dataclasses
import time

import numpy as np
import tensorflow as tf

from trainer import caching
from trainer import errors
from trainer import model as model_lib
from trainer import pipelines


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a phase trains on; decided before training, shown by --dry_run and the log."""
    cached: bool       # computed once by the backbone pass, not read from images every epoch
    description: str


def fine_tune_cut(config, classifier, fine_tune_at):
    """The model.Cut phase 2 trains above, or None when it reads images."""
    if config.fine_tune_epochs and config.caches_features():
        return model_lib.cut(classifier, fine_tune_at)
    return None


def phase_inputs(config, cut):
    """{phase name: Inputs}. cut: fine_tune_cut()'s."""
    if config.cache_features == "off":
        images = "images every epoch (--cache_features=off)"
    elif config.augmentations():
        images = ("images every epoch: --augment changes them each time, so the backbone's "
                  "outputs cannot be cached")
    else:
        images = None
    head = Inputs(False, images) if images else Inputs(
        True, "pooled backbone features, cached in one backbone pass: the head trains on them")
    if images:
        fine_tune = Inputs(False, images)
    elif cut is None:
        fine_tune = Inputs(False, "images every epoch: no frozen backbone layer below "
                                  "--fine_tune_at to cache the outputs of")
    else:
        shapes = " + ".join("x".join(map(str, shape)) for shape in cut.shapes)
        below = cut.fine_tune_at - cut.layer
        moved = (f", {below} frozen layer(s) below --fine_tune_at={cut.fine_tune_at}, where "
                 "fewer values cross" if below else "")
        fine_tune = Inputs(True, f"the activations entering backbone layer {cut.layer}{moved} "
                                 f"({shapes}, {cut.bytes_per_image(2) / 1024:.1f} KB an image "
                                 "as float16 unless their values do not fit it, then twice "
                                 "that as float32), cached in the same pass: the layers from "
                                 "there up, the pooling and the head run on them")
    return {"head": head, "fine_tune": fine_tune}


def read_images_once(config, strategy, policy, source, classifier, fine_tune_at, run_cache,
                     chief, stop_check, starting="head"):
    """The PhaseData of a run, after the pass over the images that finds the bad ones and
    computes what the phases train on (caching.py). The backbone pass keeps its chunks in
    --feature_cache, else in run_cache (--model_dir/cache). starting: the phase this process
    trains first, whose inputs are read first when they are kept."""
    cut = fine_tune_cut(config, classifier, fine_tune_at)
    inputs = phase_inputs(config, cut)
    phases = [name for name, epochs in (("head", config.epochs),
                                        ("fine_tune", config.fine_tune_epochs)) if epochs]
    for name in phases:
        print(f"phase {name} trains on {inputs[name].description}", flush=True)
    if config.feature_cache and not any(inputs[name].cached for name in phases):
        print(f"--feature_cache={config.feature_cache} is not used: no phase trains on what "
              "the backbone computes once", flush=True)
    cache_folder = ((config.feature_cache, f"--feature_cache {config.feature_cache}")
                    if config.feature_cache else (run_cache, run_cache))
    began = time.time()
    computed, store = caching.read_images_once(config, strategy, policy, source, classifier,
                                               cut, inputs, cache_folder, chief, stop_check,
                                               starting)
    return PhaseData(config, strategy, computed, classifier, cut, inputs, store,
                     round(time.time() - began, 2))


class PhaseData:
    """The training batches and validation data of each phase, for one run. A phase's data
    starts at a given step: the order follows from the step alone, for exact resume."""

    def __init__(self, config, strategy, computed, classifier, cut, inputs, store,
                 pass_seconds):
        self.config = config
        self.pass_seconds = pass_seconds  # of the backbone pass (or the chunks' read), wall
        self.strategy = strategy
        self.global_batch = config.batch_size
        self.source = computed.source
        self.classifier = classifier
        self.cut = cut
        self.inputs = inputs
        self._store = store
        self.images_read = computed.from_storage  # by the pass, this time
        self._decoded = computed.decoded  # images decoded once, for the phases that read images
        # phase: [train, validation] cached inputs, or the function that reads them (when the
        # pass found them kept: see caching.BackbonePass.run).
        self._arrays_of = dict(computed.arrays_of)
        self._bytes_of = {}  # phase: bytes of its cached inputs, once this process has them
        for phase in self._arrays_of:
            if not callable(self._arrays_of[phase]):
                self._note_bytes(phase)
        self._multiworker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)

    @property
    def cache_bytes_per_image(self):
        """Of the cached inputs of the phases this process held."""
        return sum(self._bytes_of.values()) // (len(self.source.train) +
                                               len(self.source.validation))

    def _note_bytes(self, phase):
        self._bytes_of[phase] = sum(array.nbytes for split in self._arrays_of[phase]
                                    for array in split)

    def model(self, phase):
        """What a training step of `phase` runs: the head on features, the top above the cut
        on activations, or the whole model on images."""
        if not self.inputs[phase.name].cached:
            return self.classifier.model
        return self.classifier.head if phase.name == "head" else self.cut.top

    def for_phase(self, phase, first_step, end_step):
        """(training batches of steps [first_step, end_step) of the phase, (validation dataset,
        its steps)): cached inputs, or images decoded once into memory, or images streamed and
        decoded every epoch."""
        train, batch = self.source.train, self.global_batch
        order = pipelines.train_order(len(train), batch, self.config.seed, first_step, end_step)
        weights = pipelines.train_weights(len(train), batch, first_step, end_step)
        if self.inputs[phase.name].cached:
            train_inputs, validation_inputs = self._cached(phase)
            return (self._arrays(train_inputs, train, order, weights),
                    self._validation_data(validation_inputs))
        if self._decoded:
            train_images, validation_images = self._decoded
            return (self._arrays(train_images, train, order, weights),
                    self._validation_data(validation_images))
        stream = self.strategy.distribute_datasets_from_function(
            lambda context: pipelines.training_pipeline(
                train, first_step, end_step, batch, self.config.image_size,
                self.config.seed, context, self.config.deterministic))
        return stream, self._validation_data()

    def _cached(self, phase):
        """[train inputs, validation inputs] of a cached phase, read now if they were left
        until it starts."""
        if phase.name == "fine_tune":
            self._arrays_of.pop("head", None)  # the backbone changes from here on
        if callable(self._arrays_of[phase.name]):
            self._arrays_of[phase.name] = self._arrays_of[phase.name]()
            self._note_bytes(phase.name)
        return self._arrays_of[phase.name]

    def _validation_data(self, arrays=None):
        """The validation split, each example once, from arrays of decoded images or cached
        inputs, else from the image files; with the steps that cover it."""
        split, batch = self.source.validation, self.global_batch
        order, weights = pipelines.evaluation_order(len(split), batch)
        dataset = (self._arrays(arrays, split, order, weights) if arrays is not None
                   else self.strategy.distribute_datasets_from_function(
                       lambda context: pipelines.pipeline(split, order, weights, batch,
                                                          self.config.image_size, context)))
        return dataset, len(order) // batch

    def _arrays(self, arrays, split, order, weights):
        batch = self.global_batch
        return self.strategy.distribute_datasets_from_function(
            lambda context: pipelines.array_pipeline(arrays, split.labels, order, weights,
                                                     batch, context))

    def predict_validation(self, phase):
        """Class probabilities of every validation example after `phase`, the run's last: from
        its cached inputs when it has them (so that a run resumed after its training reads no
        image), else one pass over the images."""
        if self.inputs[phase.name].cached:
            model, arrays = self.model(phase), self._cached(phase)[1]
            # One graph for every batch: called eagerly, layer by layer, the top took 4 s for
            # 5,000 images, three times the epoch's validation.
            predict = tf.function(
                lambda *inputs: model(model_lib.unlist(list(inputs)), training=False),
                input_signature=[tf.TensorSpec((None, *array.shape[1:]), tf.float32)
                                 for array in arrays])
            batch = self.global_batch  # the activations of a batch through the top
            logits = np.concatenate([
                predict(*[array[start:start + batch].astype(np.float32, copy=False)
                          for array in arrays])
                for start in range(0, len(arrays[0]), batch)])
            return tf.nn.softmax(tf.cast(logits, tf.float32)).numpy()
        inference = self.classifier.inference
        image_pass = caching.ImagePass(self.config, self.strategy, self._store, lambda: None)
        with errors.from_tensorflow(self.config.data, self._multiworker):
            [logits], bad = image_pass.outputs(
                lambda images: inference(images, training=False),
                [(inference.output_shape[1:], np.float32)], self.source.validation)
        if bad:
            row, why = next(iter(bad.items()))
            raise errors.UserError(
                f"{self.source.validation.paths[row]} {why} for the validation report, though "
                "it was read before: check it and run the same command again (training is "
                "kept)")
        return tf.nn.softmax(logits).numpy()
