"""What each phase trains and validates on, and where it comes from.

Decided before training (phase_inputs: shown by --dry_run and the log) and set up when a phase
starts (PhaseData.for_phase). Without random augmentation, what the frozen part of the model
computes from an image never changes, so it is computed once, in one backbone pass for both
phases:
- phase 1 (head): the head alone trains on the pooled backbone features;
- phase 2 (fine_tune): the top (backbone layers from the cut up, the pooling and the head)
  trains on the activations at the cut below --fine_tune_at (model.cut), stored as float16.
With --feature_cache they are read from a shared folder where a job with the same key kept
them, and published there once computed. Otherwise (--augment, --cache_features=off) the whole
model trains on images decoded once into memory, or streamed and decoded every epoch. Under
multi-worker each worker computes its share of the pass and gathers the rest, and all agree on
what is read and what is computed.

It owns the arrays (in a cache.Store, whose storage and keys are cache.py's) and the tf.data
pipelines over them or over the images. It trains nothing, and it checkpoints nothing: the
loop (train.py) calls it, and it calls back only to stop between batches of a long pass.
"""

import dataclasses
import time

from absl import logging
import numpy as np
import tensorflow as tf

from trainer import cache
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


class PhaseData:
    """The training batches and validation data of each phase, for one run. A phase's data
    starts at a given step: the order follows from the step alone, for exact resume."""

    def __init__(self, config, strategy, schedule, execution, source, classifier, fine_tune_at,
                 chief, stop_check):
        self.config = config
        self.strategy = strategy
        self.schedule = schedule
        self.source = source
        self.classifier = classifier
        self.chief = chief
        self.cut = fine_tune_cut(config, classifier, fine_tune_at)
        self.inputs = phase_inputs(config, self.cut)
        self.cache_bytes_per_image = 0  # of what the backbone pass cached, all phases
        self.shared = cache.SharedCache(config.feature_cache) if config.feature_cache else None
        self._stop_check = stop_check  # called between batches of a long pass
        self._policy = execution.policy
        self._multiworker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        self._store = cache.Store(config.memory_budget_mb * 2**20)
        self._decoded = None  # images decoded once, for the phases that read images
        self._arrays_of = {}  # phase name: [train, validation] cached inputs, lists of arrays
        self._common_key = None  # the job-wide part of a --feature_cache key, once needed
        self._versions = {}  # --feature_cache entry: the version a publish is conditional on
        # (model, validation inputs) of the cached phase being trained, for the final report.
        self._validation = None

    def model(self, phase):
        """What a training step of `phase` runs: the head on features, the top above the cut
        on activations, or the whole model on images."""
        if not self.inputs[phase.name].cached:
            return self.classifier.model
        return self.classifier.head if phase.name == "head" else self.cut.top

    def for_phase(self, phase, first_step):
        """(training batches from first_step to the end of the phase, (validation dataset,
        its steps)): cached inputs, or images decoded once into memory, or images streamed and
        decoded every epoch."""
        end_step = self.schedule.end_step(phase)
        train, batch = self.source.train, self.schedule.global_batch
        order = pipelines.train_order(len(train), batch, self.config.seed, first_step, end_step)
        weights = pipelines.train_weights(len(train), batch, first_step, end_step)
        self._validation = None
        if self.inputs[phase.name].cached:
            train_inputs, validation_inputs = self._cached(phase, first_step)
            self._validation = (self.model(phase), validation_inputs)
            return (self._arrays(train_inputs, train, order, weights),
                    self._validation_data(validation_inputs))
        if self._decoded is None:
            self._decoded = self._decode_once() or ()
        if self._decoded:
            train_images, validation_images = self._decoded
            return (self._arrays(train_images, train, order, weights),
                    self._validation_data(validation_images))
        stream = self.strategy.distribute_datasets_from_function(
            lambda context: pipelines.training_pipeline(
                train, first_step, end_step, batch, self.config.image_size,
                self.config.seed, context, self.config.deterministic))
        return stream, self._validation_data()

    def _validation_data(self, arrays=None):
        """The validation split, each example once, from arrays of decoded images or cached
        inputs, else from the image files; with the steps that cover it."""
        split, batch = self.source.validation, self.schedule.global_batch
        order, weights = pipelines.evaluation_order(len(split), batch)
        dataset = (self._arrays(arrays, split, order, weights) if arrays is not None
                   else self._images(split, order, weights))
        return dataset, len(order) // batch

    def _images(self, split, order, weights):
        batch, size = self.schedule.global_batch, self.config.image_size
        return self.strategy.distribute_datasets_from_function(
            lambda context: pipelines.pipeline(split, order, weights, batch, size, context))

    def _arrays(self, arrays, split, order, weights):
        batch = self.schedule.global_batch
        return self.strategy.distribute_datasets_from_function(
            lambda context: pipelines.array_pipeline(arrays, split.labels, order, weights,
                                                     batch, context))

    def _cached(self, phase, step):
        """[train, validation] cached inputs of `phase`, each a list of arrays with a row an
        example. The first call computes them together with those of the cached phase still
        to come: one backbone pass for both phases (the frozen part does not change in
        either). With --feature_cache, what is found there is read instead, and what is
        computed is published there for later jobs."""
        if phase.name in self._arrays_of:
            if phase.name == "fine_tune":
                self._arrays_of.pop("head", None)  # the backbone changes from here on
            return self._arrays_of[phase.name]
        wanted = [later.name for later in self.schedule.phases
                  if self.inputs[later.name].cached and step < self.schedule.end_step(later)
                  and later.end_epoch >= phase.end_epoch]
        keys = {name: self._entry_key(name) for name in wanted} if self.shared else {}
        began = time.time()
        found = self._read_shared(keys)
        missing = self._everywhere([name for name in wanted if name not in found])
        read = [name for name in wanted if name not in missing]
        self._arrays_of.update({name: found[name] for name in read})
        if read:
            self._announce(read, time.time() - began, self.shared.folder)
        if missing:
            self._compute(missing)
            if self.chief:
                self._publish_shared({name: keys[name] for name in missing if name in keys})
        return self._arrays_of[phase.name]

    def _compute(self, names):
        """The backbone pass: what phases `names` train on, into self._arrays_of."""
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
            self._arrays_of[name] = [arrays[:count] for arrays in splits]
            splits = [arrays[count:] for arrays in splits]
        self._announce(names, time.time() - began)

    # -- --feature_cache (see cache.SharedCache) ---------------------------------------------

    def _entry_key(self, name):
        if self._common_key is None:
            self._common_key = cache.common_key(self.config, self._policy, self.source)
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
                published = self.shared.publish(entry, cache.encode(key, self._arrays_of[name]),
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

    def _announce(self, names, seconds, shared_folder=None):
        """What phases `names` train on was computed in `seconds`, or read from
        --feature_cache's shared_folder."""
        parts = {"head": ("backbone features", "the head trains on the features")}
        if self.cut:
            parts["fine_tune"] = (f"activations entering layer {self.cut.layer}",
                                  "phase fine_tune trains the top on the activations")
        what, who = zip(*(parts[name] for name in names))
        arrays = [array for name in names for split in self._arrays_of[name] for array in split]
        size = sum(array.nbytes for array in arrays)
        images = len(self.source.train) + len(self.source.validation)
        self.cache_bytes_per_image = sum(array.nbytes for splits in self._arrays_of.values()
                                         for split in splits for array in split) // images
        on_disk = any(isinstance(array, np.memmap) for array in arrays)
        stored = ("; activations as " + ", ".join(sorted({array.dtype.name for array in
                                                         self._arrays_of["fine_tune"][0]}))
                  if "fine_tune" in names else "")
        images_line = (f"{' and '.join(what)} of {len(self.source.train)} train and "
                       f"{len(self.source.validation)} validation images")
        done = (f"read {images_line} from --feature_cache {shared_folder} in {seconds:.1f}s, "
                "no backbone pass" if shared_folder else f"cached {images_line} in {seconds:.1f}s")
        print(f"{done} ({size / 2**20:.1f} MB, {size / images / 1024:.1f} KB an image{stored}"
              f"{', in files in the temp dir' if on_disk else ''}): "
              f"{'; '.join(who)} (--cache_features)", flush=True)

    # -- images decoded once -----------------------------------------------------------------

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
            self._stop_check()
            # Padding rows repeat the first examples and write the same values again.
            rows = order[step * batch:(step + 1) * batch]
            for index, values in enumerate(compute(iterator)):
                values = values.numpy()
                if results[index].dtype == np.float16 and not cache.fits_float16(values):
                    results[index] = self._store.copy(results[index], np.float32)
                results[index][rows] = values
        return results

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
