"""The pass before training that reads each image once.

An image folder is listed, not read, when the job starts (sources.scan). The first pass that
reads the images also finds the ones that cannot be read or decoded or are too large, and
leaves them out (sources.drop): the backbone pass, when a phase trains on what the frozen part
of the model computes (see phase_data.py), else the pass that decodes the images once into
memory. Only a job that streams its images every epoch reads them once more up front
(sources.check), since its first epoch would otherwise meet a bad image mid-training.

The backbone pass keeps what it computes in chunks of rows, each published as soon as it is
complete, in --feature_cache or else in --model_dir/cache: a job stopped in the middle of the
pass loses at most the chunk it was computing, and a resumed job, a later trial or another
worker finds every chunk and reads no image. A chunk records the bad images among its rows,
so those are known without reading them again, and one phase's chunks are enough to know
them all: a job that finds every chunk reads only those of the phase it trains first, and
the others when their phase starts. The cache in --model_dir is removed when the
run completes; --feature_cache's is kept for later jobs.
"""

import concurrent.futures
import dataclasses
import functools
import time

from absl import logging
import numpy as np
import tensorflow as tf

from trainer import cache
from trainer import errors
from trainer import model as model_lib
from trainer import pipelines
from trainer import progress
from trainer import sources

# Rows of a chunk: about CHUNK_BYTES of what the pass gives, within these bounds.
CHUNK_BYTES = 32 * 2**20
CHUNK_ROWS = (64, 4096)
# Chunks read at a time by a job that finds them.
CHUNK_READERS = 4

# Passes over images that a first pass left out but that read fine when checked again (a
# transient storage failure): after these, the job stops with an error.
RETRIES = 3


@dataclasses.dataclass
class Computed:
    """What the pass gave: the checked source, and what each phase trains on."""
    source: object    # sources.Source, the bad images left out
    arrays_of: dict   # phase name: [train arrays, validation arrays], one row an example,
    #                   or a function that reads them when the phase starts
    decoded: list     # [[train images], [validation images]] decoded once, or None
    from_storage: int = 0  # images read from storage by the pass


class ImagePass:
    """Passes over a source's images under the strategy: each worker reads and computes its
    share, and every worker gathers all of it (each epoch's shuffle gives a worker other
    examples: the data order follows from the global step alone, for exact resume)."""

    def __init__(self, config, strategy, store, stop_check):
        self.config = config
        self.strategy = strategy
        self.store = store
        self.stop_check = stop_check  # called between batches
        self.images_read = 0

    def run(self, function, split, rows, on_batch, bad=None):
        """function(images), a tensor or a list of them, over the images of `rows` (sorted);
        on_batch(rows given, [outputs of those rows], last row settled) after each batch.
        Images that cannot be read or decoded never come (see pipelines.image_pass): those
        are checked alone afterwards (reading just them) and added to `bad` ({row: why});
        those that read fine then (storage failed for a while) go through the pass again.
        Returns `bad`."""
        bad = {} if bad is None else bad
        given_mask = np.zeros(len(split), bool)

        def given(rows_given, values, last_settled):
            given_mask[rows_given] = True
            on_batch(rows_given, values, last_settled)

        for attempt in range(RETRIES + 1):
            self._run_once(function, split, rows, given)
            found, rows = settle_bad_rows(split, [row for row in rows[~given_mask[rows]]
                                                  if row not in bad], self.config)
            bad.update(found)
            if not len(rows):
                return bad
            if attempt == RETRIES:
                raise errors.UserError(
                    f"{len(rows)} image(s), {split.paths[rows[0]]} the first, failed to read in "
                    f"{RETRIES + 1} passes but read fine alone: check the storage and run the "
                    "same command again")
            logging.warning("%d image(s), %s the first, failed to read in the pass but read "
                            "fine alone (storage failing for a while?): reading them again",
                            len(rows), split.paths[rows[0]])

    def _run_once(self, function, split, rows, on_batch):
        batch = self.config.batch_size
        iterator = iter(self.strategy.distribute_datasets_from_function(
            lambda context: pipelines.image_pass(split, rows, batch, self.config.image_size,
                                                 self.config.max_image_pixels, context)))

        @tf.function
        def compute(iterator):
            given, images = next(iterator)
            per_replica = self.strategy.run(
                lambda g, x: [g] + [tf.cast(y, tf.float32) for y in
                                    model_lib.as_list(function(x))], args=(given, images))
            return [self.strategy.gather(value, axis=0) for value in per_replica]

        report = progress.Report("images read", len(rows))
        for step in range(pipelines.steps_per_epoch(len(rows), batch)):
            self.stop_check()
            given, *values = [value.numpy() for value in compute(iterator)]
            real = given >= 0
            settled = min((step + 1) * batch, len(rows))
            on_batch(given[real], [value[real] for value in values], rows[settled - 1])
            self.images_read += int(real.sum())
            report.update(settled)
        report.done()

    def outputs(self, function, specs, split):
        """(function over every image of the split as arrays of its length, specs: (shape,
        numpy dtype) of each output; {row: why} of the bad images, their rows left zero).
        A float16 output is stored as float32 from the first batch float16 would not hold (see
        cache.fits_float16)."""
        results = [self.store.allocate((len(split), *shape), dtype) for shape, dtype in specs]

        def on_batch(given, values, _):
            for index, value in enumerate(values):
                results[index] = store_rows(self.store, results[index], given, value)

        return results, self.run(function, split, np.arange(len(split)), on_batch)


def store_rows(store, array, rows, values):
    """array[rows] = values; returns the array, copied to float32 first when float16 would not
    hold the values. Values already float16 (a chunk kept as float16) need no check."""
    if (array.dtype == np.float16 and values.dtype != np.float16 and len(values)
            and not cache.fits_float16(values)):
        array = store.copy(array, np.float32)
    array[rows] = values
    return array


def settle_bad_rows(split, candidates, config):
    """({row: why} of the rows a pass left out that are bad, the rows that read fine when
    checked again and must be computed again). Only the left-out images are read again."""
    candidates = np.asarray(candidates, dtype=np.int64)
    if split.is_stream:  # a record that prepare or TFDS wrote cannot fail to read but once
        return {}, candidates
    why = sources.find_unreadable(split.paths[candidates], config.max_image_pixels,
                                  config.storage_retry_seconds)
    bad = {int(candidates[index]): reason for index, reason in why.items()}
    return bad, np.array([row for row in candidates if row not in bad], dtype=np.int64)


# -- the backbone pass, kept in chunks ---------------------------------------------------------

@dataclasses.dataclass
class _Entry:
    """What the backbone pass gives one phase, kept as a --feature_cache entry of chunks."""
    phase: str
    key: dict
    specs: list       # (shape, numpy dtype) of each output
    chunk_rows: int

    @classmethod
    def of(cls, phase, key, specs):
        per_image = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in specs)
        low, high = CHUNK_ROWS
        return cls(phase, key, specs, int(np.clip(CHUNK_BYTES // max(per_image, 1), low, high)))

    def chunks(self, count):
        return [(start, min(start + self.chunk_rows, count))
                for start in range(0, count, self.chunk_rows)]

    def chunk_name(self, split_name, start, end):
        return cache.chunk_name(self.key, split_name, start, end)

    def chunk_key(self, split_name, start, end):
        return {**self.key, "split": split_name, "rows": [start, end]}


class BackbonePass:
    """What the frozen part computes for the cached phases, read from chunks kept earlier or
    computed (and kept) by one pass over the images."""

    def __init__(self, config, strategy, policy, source, classifier, cut, shared, chief,
                 image_pass, multiworker, for_later_jobs):
        self.config = config
        self.strategy = strategy
        self.source = source
        self.classifier = classifier
        self.cut = cut
        self.shared = shared  # cache.SharedCache: --feature_cache, or --model_dir/cache
        self.for_later_jobs = for_later_jobs  # --feature_cache: say what was kept
        self.chief = chief
        self.image_pass = image_pass
        self.store = image_pass.store
        self.multiworker = multiworker
        self.common = cache.common_key(config, policy, source)
        self._versions = {}  # chunk name: the version a publish is conditional on
        self.chunks_read = {}  # phase: chunks read rather than computed
        self.published = {}  # phase: chunks this job published
        self.deferred = {}  # phase: the _Entry of its chunks, read when the phase starts

    def _entry(self, phase):
        features = self.classifier.features
        if phase == "head":
            computing, specs = features, [(features.output_shape[1:], np.float32)]
        else:
            computing, specs = self.cut.bottom, [(shape, np.float16) for shape in self.cut.shapes]
        return _Entry.of(phase, cache.entry_key(self.common, phase, computing, self.cut), specs)

    def run(self, phases, starting):
        """({phase: [train arrays, validation arrays]}, {split name: {row: why}} of the bad
        images), the arrays the length of the listed splits, bad rows left as zeros.

        When every chunk of every phase is kept (a resume, a --feature_cache hit), only those
        of `starting`, the phase this process trains first, are read now: they give the bad
        images too. The others are left out of the result and listed in `self.deferred`, to be
        read when their phase starts (read_deferred): a resume in phase 2 never reads phase 1's
        features, and a phase's arrays are not held while another trains."""
        began = time.time()
        entries = [self._entry(phase) for phase in phases]
        now = entries
        if len(entries) > 1 and not self._everywhere(entries, self._absent(entries)):
            now = [entry for entry in entries if entry.phase == starting] or entries[:1]
        arrays, bad = {}, {name: {} for name in sources.SPLITS}
        missing = self._read(now, arrays, bad)
        if missing and now != entries:
            # A pass over the images after all (a chunk could not be read): it computes
            # every phase's rows at once.
            missing |= self._read([entry for entry in entries if entry not in now], arrays,
                                  bad)
            now = entries
        self.deferred = {entry.phase: entry for entry in entries if entry not in now}
        entries = now
        read_phases = [entry.phase for entry in entries
                       if not any(key[0] == entry.phase for key in missing)]
        for name in sources.SPLITS:
            self._compute(name, [entry for entry in entries if entry.phase not in read_phases],
                          arrays, bad, missing)
        self._announce(entries, read_phases, arrays, time.time() - began)
        for phase, entry in self.deferred.items():
            print(f"{cache.describe(entry.key)} found in {self.shared.described}: read when "
                  f"phase {phase} starts", flush=True)
        self._say_kept(entries)
        return ({phase: [arrays[phase][name] for name in sources.SPLITS] for phase in arrays},
                bad)

    def read_deferred(self, phase, bad, kept):
        """[train arrays, validation arrays] of a phase run() deferred, of the examples kept
        (`kept`: the rows of each split that `bad`, run()'s, left in). A chunk that cannot be
        read now is computed, reading its images; one of those that no longer reads is an
        error, since the run's examples cannot change in the middle of it."""
        began = time.time()
        entry = self.deferred.pop(phase)
        arrays, found = {}, {name: dict(bad[name]) for name in sources.SPLITS}
        missing = self._read([entry], arrays, found)
        for name in sources.SPLITS:
            self._compute(name, [entry], arrays, found, missing)
            changed = sorted(set(found[name]) - set(bad[name]))
            if changed:
                row = changed[0]
                raise errors.UserError(
                    f"{getattr(self.source, name).paths[row]} {found[name][row]} for phase "
                    f"{phase}, though it read when the job started: check it and run the same "
                    "command again (training is kept)")
        self._announce([entry], [] if missing else [phase], arrays, time.time() - began)
        self._say_kept([entry])
        return [[cache.compact(array, rows) for array in arrays[phase][name]]
                for name, rows in zip(sources.SPLITS, kept)]

    def _read(self, entries, arrays, bad):
        """Allocates arrays[phase] of each of `entries`, the length of the listed splits, and
        fills them and `bad` from the chunks found whole; returns the set of (phase, split
        name, start, end) of the chunks missing on any worker."""
        for entry in entries:
            arrays[entry.phase] = {
                name: [self.store.allocate((len(getattr(self.source, name)), *shape), dtype)
                       for shape, dtype in entry.specs]
                for name in sources.SPLITS}
        return self._everywhere(entries, self._read_chunks(entries, arrays, bad))

    def _say_kept(self, entries):
        """What this job published in --feature_cache, for later jobs."""
        if self.for_later_jobs:
            for entry in entries:
                if self.published.get(entry.phase):
                    print(f"kept {cache.describe(entry.key)} in {self.shared.described} "
                          f"({self.published[entry.phase]} chunk(s)) for later jobs with the "
                          "same key", flush=True)

    def _absent(self, entries):
        """The set of (phase, split name, start, end) of the chunks of `entries` not in one
        listing of the cache (all of them when it cannot be listed)."""
        chunks = {(entry.phase, name, start, end): entry.chunk_name(name, start, end)
                  for entry in entries for name in sources.SPLITS
                  for start, end in entry.chunks(len(getattr(self.source, name)))}
        try:
            names = self.shared.names()
        except self.shared.transient as error:
            logging.warning("could not list the feature cache %s (%s): reading every entry",
                            self.shared.described, errors.first_line(error))
            return set(chunks)
        return {chunk for chunk, name in chunks.items() if name not in names}

    def _read_chunks(self, entries, arrays, bad):
        """Fills `arrays` and `bad` from the chunks found whole; returns the set of (phase,
        split name, start, end) of the others. A damaged chunk is reported and computed again.
        CHUNK_READERS chunks are read and checked at a time (the hash and the reads release
        the GIL; from gs:// each read waits on the network) while this thread copies out the
        ones before."""
        missing = set()
        chunks = [(entry, name, start, end, entry.chunk_name(name, start, end))
                  for entry in entries for name in sources.SPLITS
                  for start, end in entry.chunks(len(getattr(self.source, name)))]
        with concurrent.futures.ThreadPoolExecutor(CHUNK_READERS) as pool:
            fetched = sources.in_windows(pool, lambda chunk: self._fetch(*chunk), chunks,
                                         CHUNK_READERS)
            for (entry, name, start, end, chunk), (version, decoded) in zip(chunks, fetched):
                self._versions[chunk] = version
                if decoded is None:
                    missing.add((entry.phase, name, start, end))
                    continue
                values, meta = decoded
                for index, value in enumerate(values):
                    arrays[entry.phase][name][index] = store_rows(
                        self.store, arrays[entry.phase][name][index], slice(start, end), value)
                bad[name].update({int(row): why for row, why in meta.items()})
                self.chunks_read[entry.phase] = self.chunks_read.get(entry.phase, 0) + 1
        return missing

    def _fetch(self, entry, name, start, end, chunk):
        """(the version a replacement of the file `chunk` is conditional on, cache.decode's
        (arrays, meta) or None when it is absent or cannot be used)."""
        version = None
        try:
            content, version = self.shared.read(chunk)
            if content is not None:
                return version, cache.decode(content, entry.chunk_key(name, start, end))
        except cache.Damaged as damaged:
            logging.warning("feature cache entry %s is damaged (%s): computing it again",
                            self.shared.path(chunk), damaged)
        except self.shared.transient as error:
            logging.warning("could not read the feature cache entry %s (%s): computing it",
                            self.shared.path(chunk), errors.first_line(error))
        return version, None

    def _everywhere(self, entries, missing):
        """The chunks missing on any worker: every worker must run the pass over them together
        (its gathers are collective)."""
        if not self.multiworker:
            return missing
        every = [(entry.phase, name, start, end) for entry in entries
                 for name in sources.SPLITS
                 for start, end in entry.chunks(len(getattr(self.source, name)))]
        flags = tf.constant([float(chunk in missing) for chunk in every])
        total = self.strategy.reduce(tf.distribute.ReduceOp.SUM,
                                     self.strategy.run(tf.function(lambda: tf.identity(flags))),
                                     axis=None)
        return {chunk for chunk, count in zip(every, total.numpy()) if count > 0}

    def _model(self, phases):
        if phases == ["head"]:
            return self.classifier.features
        # The phase-1 features come out of the top of the same pass.
        return self.cut.bottom if phases == ["fine_tune"] else self.cut.both

    def _compute(self, name, entries, arrays, bad, missing):
        """Runs the pass over the rows of split `name` that chunks of `entries` miss, publishing
        each chunk as soon as all its rows are settled."""
        split = getattr(self.source, name)
        pending = sorted(((start, end, entry) for entry in entries
                          for phase, split_name, start, end in missing
                          if (phase, split_name) == (entry.phase, name)),
                         key=lambda chunk: chunk[1])
        if not pending:
            return
        entries = [entry for entry in entries if any(chunk[2] is entry for chunk in pending)]
        todo = np.zeros(len(split), bool)
        for start, end, _ in pending:
            todo[start:end] = True
        if split.is_stream:  # records are read front to back: from the first missing one on
            todo[np.argmax(todo):] = True
        given_mask = np.zeros(len(split), bool)
        model = self._model([entry.phase for entry in entries])

        def on_batch(given, values, last_settled):
            given_mask[given] = True
            for entry in entries:
                for index in range(len(entry.specs)):
                    arrays[entry.phase][name][index] = store_rows(
                        self.store, arrays[entry.phase][name][index], given, values[index])
                values = values[len(entry.specs):]
            self._publish_settled(name, pending, arrays, bad, given_mask, last_settled)

        self.image_pass.run(lambda images: model(images, training=False), split,
                            np.flatnonzero(todo), on_batch, bad[name])
        self._publish_settled(name, pending, arrays, bad, given_mask, len(split))

    def _publish_settled(self, name, pending, arrays, bad, given_mask, last_settled):
        """Publishes the pending chunks of split `name` whose rows up to last_settled are all
        given or known bad; a left-out row not known yet is checked now (reading just it)."""
        split = getattr(self.source, name)
        while pending and pending[0][1] - 1 <= last_settled:
            start, end, entry = pending[0]
            unsettled = [row for row in np.flatnonzero(~given_mask[start:end]) + start
                         if row not in bad[name]]
            found, again = settle_bad_rows(split, unsettled, self.config)
            bad[name].update(found)
            if len(again):
                return  # read again by the next attempt, and published after it
            pending.pop(0)
            if self.chief:
                self._publish(entry, name, start, end, arrays, bad)

    def _publish(self, entry, name, start, end, arrays, bad):
        chunk = entry.chunk_name(name, start, end)
        meta = {str(row): why for row, why in bad[name].items() if start <= row < end}
        content = cache.encode(entry.chunk_key(name, start, end),
                               [array[start:end] for array in arrays[entry.phase][name]], meta)
        try:
            if self.shared.publish(chunk, content, self._versions.get(chunk)):
                self.published[entry.phase] = self.published.get(entry.phase, 0) + 1
        except self.shared.transient as error:
            logging.warning("could not write the feature cache entry %s (%s): it is computed "
                            "again when needed", self.shared.path(chunk), errors.first_line(error))

    def _announce(self, entries, read_phases, arrays, seconds):
        parts = {"head": ("backbone features", "the head trains on the features")}
        if self.cut:
            parts["fine_tune"] = (f"activations entering layer {self.cut.layer}",
                                  "phase fine_tune trains the top on the activations")
        train, validation = len(self.source.train), len(self.source.validation)
        for read in (True, False):
            names = [entry.phase for entry in entries if (entry.phase in read_phases) == read]
            if not names:
                continue
            what, who = zip(*(parts[name] for name in names))
            values = [array for name in names for split in arrays[name].values()
                      for array in split]
            size = sum(array.nbytes for array in values)
            on_disk = any(isinstance(array, np.memmap) for array in values)
            stored = ("; activations as " + ", ".join(sorted(
                {array.dtype.name for array in arrays["fine_tune"]["train"]}))
                if "fine_tune" in names else "")
            images = f"{' and '.join(what)} of {train} train and {validation} validation images"
            if read:
                done = f"read {images} from {self.shared.described} in {seconds:.1f}s, no backbone pass"
            else:
                chunks = sum(self.chunks_read.get(name, 0) for name in names)
                continued = (f", {chunks} chunk(s) of it read from {self.shared.described}"
                             if chunks else "")
                done = f"cached {images} in {seconds:.1f}s{continued}"
            print(f"{done} ({size / 2**20:.1f} MB, {size / (train + validation) / 1024:.1f} KB "
                  f"an image{stored}{', in files in the temp dir' if on_disk else ''}): "
                  f"{'; '.join(who)} (--cache_features)", flush=True)


# -- the stage -------------------------------------------------------------------------------

def read_images_once(config, strategy, policy, source, classifier, cut, inputs, cache_folder,
                     chief, stop_check, starting):
    """Computed: the bad images found and left out, and what the phases train on that one
    pass gives. cache_folder: (folder, how lines name it) where the backbone pass keeps its
    chunks; starting: the phase this process trains first (BackbonePass.run)."""
    store = cache.Store(config.memory_budget_mb * 2**20)
    image_pass = ImagePass(config, strategy, store, stop_check)
    multiworker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    phases = [phase for phase, epochs in (("head", config.epochs),
                                          ("fine_tune", config.fine_tune_epochs))
              if epochs and inputs[phase].cached]
    arrays_of, decoded = {}, None
    if phases:
        backbone = BackbonePass(config, strategy, policy, source, classifier, cut,
                                cache.SharedCache(*cache_folder), chief, image_pass, multiworker,
                                bool(config.feature_cache))
        arrays_of, bad = backbone.run(phases, starting)
        source, kept = _checked(source, bad)
        arrays_of = {phase: [[cache.compact(array, rows) for array in arrays]
                             for arrays, rows in zip(splits, kept)]
                     for phase, splits in arrays_of.items()}
        arrays_of.update({phase: functools.partial(backbone.read_deferred, phase, bad, kept)
                          for phase in backbone.deferred})
    if any(not inputs[phase].cached for phase, epochs in (("head", config.epochs),
                                                         ("fine_tune", config.fine_tune_epochs))
           if epochs):
        decoded, source = decode_once(config, image_pass, source)
    return Computed(source, arrays_of, decoded, image_pass.images_read), store


def _checked(source, bad):
    """(the source without the bad images, the rows kept of each split)."""
    if source.checked:
        return source, [np.arange(len(getattr(source, name))) for name in sources.SPLITS]
    kept = [np.setdiff1d(np.arange(len(getattr(source, name))), sorted(bad[name]))
            for name in sources.SPLITS]
    return sources.drop(source, bad), kept


def decode_once(config, image_pass, source):
    """(train and validation images decoded and resized once, or None when they do not fit
    within what is left of --memory_budget_mb, the checked source). Without them the images
    are streamed every epoch, and checked first by reading them all."""
    size = config.image_size
    count = len(source.train) + len(source.validation)
    if count * size * size * 3 * 4 > image_pass.store.memory_left:
        return None, sources.check(source, config.max_image_pixels, config.storage_retry_seconds)
    began = time.time()
    decoded, bad = [], {}
    for name in sources.SPLITS:
        split = getattr(source, name)
        [images], bad[name] = image_pass.outputs(tf.identity, [((size, size, 3), np.float32)],
                                                 split)
        decoded.append(images)
    source, kept = _checked(source, bad)
    count = len(source.train) + len(source.validation)
    print(f"decoded {count} images once in {time.time() - began:.1f}s "
          f"({count * size * size * 12 / 2**20:.0f} MB in memory): later epochs read "
          "them from there", flush=True)
    return [[cache.compact(images, rows)] for images, rows in zip(decoded, kept)], source
