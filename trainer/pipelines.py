"""Splits in, distributed tf.data pipelines of per-replica (images, labels, weights) out:
ordering, sharding between input pipelines, decoding.

The order of every epoch is a seeded permutation of the split computed up front, so the
position in the data is a function of the global step alone: resuming at step N (mid-epoch
included) rebuilds exactly the batches that step N would have seen, with no iterator state to
checkpoint. Each epoch is padded to whole global batches by wrapping around its own
permutation, giving static batch shapes (TPU) and every image at least once per epoch.
Evaluation pads the same way and gives the padding weight 0.
"""

import math
import os

import numpy as np
import tensorflow as tf

from trainer import files
from trainer import records
from trainer import sources

AUTOTUNE = tf.data.AUTOTUNE
# Reads of remote files in flight at once. Each waits tens of milliseconds on the network and
# takes little CPU, so many overlap; AUTOTUNE, which sizes a map's parallelism to the cores
# (_untuned), would keep only as many reads in flight as there are cores. Each holds a read
# buffer of GCS_READ_CACHE_BLOCK_SIZE_MB (see trainer/__init__.py).
REMOTE_READS = 16


def _untuned(dataset):
    """The dataset with tf.data's autotuning off: AUTOTUNE parallelism is then the number of
    cores, and prefetch buffers still grow when the consumer waits.

    Autotuning runs a thread per iterator that sleeps between optimisations, up to 60 s as the
    iterator ages, and freeing the iterator waits for that thread. TensorFlow wakes it before
    marking the iterator cancelled, so on a loaded machine it can miss the wake-up and sleep
    on: a job sat up to 40 s after its last epoch (docs/benchmarks.md). On a CPU host
    autotuning gains nothing here: each map call decodes a whole batch, and the cores are the
    limit either way."""
    options = tf.data.Options()
    options.autotune.enabled = False
    # The default, 16, would leave a large TPU host's cores idle.
    options.autotune.initial_parallelism = os.cpu_count()
    return dataset.with_options(options)


# -- decoding --------------------------------------------------------------------------------

# What decode_and_resize makes of an image file, for keys of what is computed from its pixels.
PIXELS = "decode_image(channels=3, uint8), resize bilinear to image_size, float32 0..255"


def decode_and_resize(contents, image_size):
    """Encoded bytes of any supported format to float32 RGB in 0..255, image_size square.

    Shared by training and the exported serving signature, so both see identical pixels.
    Grayscale, RGBA, 16-bit and palette images come out as 8-bit RGB; a GIF gives its first
    frame.
    """
    image = tf.io.decode_image(contents, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return tf.image.resize(image, [image_size, image_size])


def decode_batch(batch, image_size, read_files):
    """decode_and_resize over a batch of encoded images (or of paths, read_files=True), for
    training and serving.

    One tf.data function call a batch rather than one an image: on a small CPU the fixed cost
    of each call is of the order of reading a local file, so per-image calls cost more CPU than
    the reads themselves.
    """
    def one(source):
        return decode_and_resize(tf.io.read_file(source) if read_files else source, image_size)

    return tf.map_fn(one, batch,
                     fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))


# -- orders ----------------------------------------------------------------------------------

def steps_per_epoch(num_examples, global_batch):
    return max(1, math.ceil(num_examples / global_batch))


def train_order(num_examples, global_batch, seed, start_step, end_step):
    """Example indices that training steps [start_step, end_step) consume, in order."""
    steps = steps_per_epoch(num_examples, global_batch)
    first_epoch, last_epoch = start_step // steps, math.ceil(end_step / steps)
    epochs = [np.resize(np.random.default_rng([seed, epoch]).permutation(num_examples),
                        steps * global_batch) for epoch in range(first_epoch, last_epoch)]
    order = np.concatenate(epochs)
    offset = first_epoch * steps
    return order[(start_step - offset) * global_batch:(end_step - offset) * global_batch]


def train_weights(num_examples, global_batch, start_step, end_step):
    """Weights of the examples train_order gives: 1, and 0 for the padding that fills an
    epoch's last batch, so that every image counts once an epoch in the loss and the metrics."""
    padded = steps_per_epoch(num_examples, global_batch) * global_batch
    positions = np.arange(start_step * global_batch, end_step * global_batch) % padded
    return (positions < num_examples).astype(np.float32)


def evaluation_order(num_examples, global_batch):
    """All indices once, padded to whole batches; the padding carries weight 0."""
    padded = steps_per_epoch(num_examples, global_batch) * global_batch
    weights = (np.arange(padded) < num_examples).astype(np.float32)
    return np.resize(np.arange(num_examples), padded), weights


def shard(values, global_batch, context):
    """This input pipeline's part of `values` (one per example in order): its own slice of every
    global batch, so that across pipelines each example is read exactly once."""
    pipelines, index = context.num_input_pipelines, context.input_pipeline_id
    return values.reshape(-1, pipelines, global_batch // pipelines)[:, index, :].reshape(-1)


# -- pipelines over a given order ------------------------------------------------------------

def _read_while_decoding(split):
    """Whether a split's files are read in the decoding map: local image files are; a remote
    file is read ahead in a map of its own (REMOTE_READS), a record comes read."""
    return not split.is_stream and not (len(split.paths) and files.is_remote(split.paths[0]))


def _ordered_records(split, order, global_batch, context):
    """A prepared split's encoded images and labels at the positions of `order`, which must be
    the records in order, wrapping around (as evaluation_order gives): TFRecords are read
    front to back. Each pipeline keeps the same slices of each global batch as shard()."""
    if not np.array_equal(order, np.resize(np.arange(len(split)), len(order))):
        raise ValueError("a prepared split can be read in record order only")
    per_pipeline = global_batch // context.num_input_pipelines
    if split.tfds:
        stream = sources.tfds_examples(*split.tfds).map(lambda contents, label, _: (contents, label))
    else:
        stream = tf.data.TFRecordDataset(split.shards).batch(global_batch).map(
            lambda batch: records.parse_batch(batch)[:2]).unbatch()
    stream = stream.repeat().take(len(order)).enumerate()
    stream = stream.filter(
        lambda position, _: (position % global_batch) // per_pipeline == context.input_pipeline_id)
    return stream.map(lambda _, example: example)


def pipeline(split, order, weights, global_batch, image_size, context, deterministic=True):
    """One input pipeline's tf.data.Dataset of per-replica (images, labels, weights) batches.

    deterministic=False lets a decoded batch overtake a slower one before it (faster reads
    from remote storage): batches then come in a slightly different order than `order` says."""
    mine = shard(order, global_batch, context)
    read_here = _read_while_decoding(split)
    if split.is_stream:
        examples = _ordered_records(split, order, global_batch, context)
    else:
        examples = tf.data.Dataset.from_tensor_slices((split.paths[mine], split.labels[mine]))
        if not read_here:
            examples = examples.map(lambda path, label: (tf.io.read_file(path), label),
                                    num_parallel_calls=REMOTE_READS, deterministic=deterministic)
    dataset = tf.data.Dataset.zip(
        (examples, tf.data.Dataset.from_tensor_slices(shard(weights, global_batch, context))))
    dataset = dataset.batch(context.get_per_replica_batch_size(global_batch), drop_remainder=True)

    def load(example, weights):
        contents, labels = example
        # Local files are read here, a batch a call, in parallel with decoding.
        return decode_batch(contents, image_size, read_here), labels, weights

    # Shuffling was done on the file list (train_order); by default the parallel map keeps
    # that order, which exact resume and row-indexed outputs (features) rely on.
    dataset = dataset.map(load, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    return _untuned(dataset.prefetch(AUTOTUNE))


def image_pass(split, rows, global_batch, image_size, max_pixels, context):
    """One input pipeline's per-replica (rows, images) batches over `rows` of a split (in
    increasing order; for a prepared or TFDS split, a range up to its end), for a pass that
    reads each image once and also finds the bad ones: an image file that cannot be read or
    decoded, or has more than max_pixels (from its header, before decoding), is left out and
    its row never given (records, which prepare or TFDS checked, are not left out). Batches are padded to whole global batches with row -1.

    Leaving out moves this pipeline's later images forward: when global batch S has been
    consumed, every row of the first S + 1 global batches of `rows` has been given or left out."""
    padded = np.full(steps_per_epoch(len(rows), global_batch) * global_batch, -1, np.int64)
    padded[:len(rows)] = rows
    mine = shard(padded, global_batch, context)
    per_replica = context.get_per_replica_batch_size(global_batch)
    read_here = _read_while_decoding(split)
    if split.is_stream:
        examples = _records_from(split, int(rows[0]), len(padded), global_batch, context)
    else:
        examples = tf.data.Dataset.from_tensor_slices(
            (mine, np.where(mine >= 0, split.paths[np.maximum(mine, 0)], "")))
        if not read_here:
            examples = examples.map(lambda row, path: (row, tf.cond(
                row >= 0, lambda: tf.io.read_file(path), lambda: tf.constant(b""))),
                num_parallel_calls=REMOTE_READS)
    blank = (tf.constant(-1, tf.int64), tf.zeros([image_size, image_size, 3]))

    def load(row, item):
        def decoded():
            # Local files are read here, in parallel with decoding.
            contents = tf.io.read_file(item) if read_here else item
            pixels = tf.numpy_function(_pixels, [contents], tf.int64, stateful=False)
            with tf.control_dependencies([tf.debugging.Assert(pixels <= max_pixels, [row])]):
                return decode_and_resize(contents, image_size)
        return row, tf.cond(row >= 0, decoded, lambda: blank[1])

    dataset = examples.map(load, num_parallel_calls=AUTOTUNE)
    if not split.is_stream:  # a damaged shard is an error to report, not an image to skip
        dataset = dataset.ignore_errors()
    dataset = dataset.concatenate(tf.data.Dataset.from_tensors(blank).repeat()).take(len(mine))
    return _untuned(dataset.batch(per_replica, drop_remainder=True).prefetch(AUTOTUNE))


def _pixels(contents):
    pixels = sources.header_pixels(contents)
    return np.int64(-1 if pixels is None else pixels)


def _records_from(split, start, count, global_batch, context):
    """(row, encoded image) of this pipeline's share of a prepared or TFDS split's records
    from `start` on, padded with row -1 to `count` positions in all."""
    per_pipeline = global_batch // context.num_input_pipelines
    if split.tfds:
        stream = sources.tfds_examples(*split.tfds).map(lambda contents, label, _: contents)
    else:
        stream = tf.data.TFRecordDataset(split.shards).batch(global_batch).map(
            lambda batch: records.parse_batch(batch)[0]).unbatch()
    rows = tf.data.Dataset.range(start, len(split))
    stream = tf.data.Dataset.zip((rows, stream.skip(start))).concatenate(
        tf.data.Dataset.from_tensors((tf.constant(-1, tf.int64), tf.constant(b""))).repeat())
    stream = stream.take(count).enumerate().filter(
        lambda position, _: (position % global_batch) // per_pipeline == context.input_pipeline_id)
    return stream.map(lambda _, example: example)


def array_pipeline(arrays, labels, order, weights, global_batch, context):
    """Like pipeline(), over examples already computed: decoded images or cached model inputs
    (a list of arrays or memmaps, one row per example; float16 ones come out as float32). The
    inputs of a batch are a tensor, or a tuple of them when there are several arrays."""
    per_replica = context.get_per_replica_batch_size(global_batch)
    dataset = tf.data.Dataset.from_tensor_slices(
        (shard(order, global_batch, context), shard(weights, global_batch, context)))
    dataset = dataset.batch(per_replica, drop_remainder=True)

    def gather(indices, batch_weights):
        # float32 from numpy: a float16 tensor in TF would send CPU kernels off oneDNN (with
        # an error-level log line on CPUs without AVX-512 FP16).
        *rows, batch_labels = tf.numpy_function(
            lambda i: [array[i].astype(np.float32, copy=False) for array in arrays] + [labels[i]],
            [indices], [tf.float32] * len(arrays) + [tf.int32])
        for row, array in zip(rows, arrays):
            row.set_shape([per_replica, *array.shape[1:]])
        batch_labels.set_shape([per_replica])
        return rows[0] if len(rows) == 1 else tuple(rows), batch_labels, batch_weights

    return _untuned(dataset.map(gather).prefetch(AUTOTUNE))


# -- streams of records for training ---------------------------------------------------------

def _shard_files(split, epoch, seed, context, deterministic):
    """(this pipeline's record stream before shuffling, whether the files were divided between
    pipelines), for one epoch of a prepared split."""
    pipelines, index = context.num_input_pipelines, context.input_pipeline_id
    shards = np.array(split.shards)[
        np.random.default_rng([seed, epoch]).permutation(len(split.shards))]
    by_file = len(shards) >= pipelines
    # Sharding by record needs every pipeline to see the records in the same order.
    deterministic = deterministic or not by_file
    if by_file:
        shards = shards[index::pipelines]
    if files.is_remote(shards[0]):
        # Remote reads wait on the network: several shards in flight keep decoding busy.
        return tf.data.Dataset.from_tensor_slices(shards).interleave(
            tf.data.TFRecordDataset, cycle_length=min(len(shards), 8),
            num_parallel_calls=AUTOTUNE, deterministic=deterministic), by_file
    # Local shards are read one after another (prepare already wrote the records in a random
    # order): on a small machine a parallel interleave's threads would take CPU from decoding.
    return tf.data.TFRecordDataset(shards), by_file


def _tfds_files(split, epoch_seed, context, deterministic):
    """The same as _shard_files for a TFDS split, whose files TFDS divides between pipelines."""
    import tensorflow_datasets as tfds
    builder, name = split.tfds
    by_file = len(builder.info.splits[name].file_instructions) >= context.num_input_pipelines
    options = tf.data.Options()
    options.deterministic = deterministic or not by_file
    read_config = tfds.ReadConfig(options=options, shuffle_seed=epoch_seed, add_tfds_id=True,
                                  input_context=context if by_file else None)
    return sources.tfds_examples(builder, name, shuffle_files=True,
                                 read_config=read_config), by_file


def epoch_records(split, epoch, seed, global_batch, context, deterministic=True):
    """One pipeline's per-replica batches of (encoded images, labels, keys, weights) for one
    epoch of a prepared or TFDS split: steps_per_epoch x its share of the global batch of
    examples, the padding with weight 0.
    Files are shuffled by (seed, epoch) and divided between pipelines when there are enough of
    them, else the examples are; a seeded shuffle buffer mixes them. Deterministic unless
    asked otherwise, so that a resumed epoch can skip ahead to exactly where it stopped."""
    pipelines, index = context.num_input_pipelines, context.input_pipeline_id
    epoch_seed = seed * 100_003 + epoch
    if split.tfds:
        examples, by_file = _tfds_files(split, epoch_seed, context, deterministic)
    else:
        examples, by_file = _shard_files(split, epoch, seed, context, deterministic)
    if not by_file:
        examples = examples.shard(pipelines, index)
    shuffled = examples.shuffle(min(len(split), 4096), seed=epoch_seed,
                                reshuffle_each_iteration=False)
    # The padding to whole global batches comes from the start of the unshuffled stream: a
    # second pass through the shuffle buffer would read the whole split again for a few records.
    steps = steps_per_epoch(len(split), global_batch)
    # The padding has weight 0: every image counts once an epoch in the loss and the metrics.
    epoch = shuffled.map(lambda *example: (*example, 1.0)).concatenate(
        examples.repeat().map(lambda *example: (*example, 0.0))).take(
        steps * global_batch // pipelines)
    epoch = epoch.batch(context.get_per_replica_batch_size(global_batch), drop_remainder=True)
    # Parsed a batch at a time: one vectorised parse instead of one per record.
    return epoch if split.tfds else epoch.map(
        lambda batch, weights: (*records.parse_batch(batch), weights))


def training_pipeline(split, first_step, end_step, global_batch, image_size, seed, context,
                      deterministic=True):
    """Per-replica (images, labels, weights) batches for training steps [first_step, end_step).

    Image files follow train_order; prepared and TFDS splits stream epoch_records, skipping
    the steps of the first epoch that were already trained."""
    if not split.is_stream:
        order = train_order(len(split), global_batch, seed, first_step, end_step)
        return pipeline(split, order, train_weights(len(split), global_batch, first_step,
                                                    end_step), global_batch,
                        image_size, context, deterministic)
    steps = steps_per_epoch(len(split), global_batch)
    # Batches a step: one per replica this pipeline feeds.
    per_step = context.num_replicas_in_sync // context.num_input_pipelines
    stream = None
    for epoch in range(first_step // steps, math.ceil(end_step / steps)):
        start, end = max(first_step - epoch * steps, 0), min(end_step - epoch * steps, steps)
        epoch_part = epoch_records(split, epoch, seed, global_batch, context,
                                   deterministic).skip(start * per_step).take(
            (end - start) * per_step)
        stream = epoch_part if stream is None else stream.concatenate(epoch_part)

    def load(contents, labels, _, weights):
        return decode_batch(contents, image_size, read_files=False), labels, weights

    # Encoded batches read ahead keep decoding busy while the next epoch fills its shuffle
    # buffer (it reads up to 4096 records before handing out the first).
    dataset = stream.prefetch(4 * per_step).map(
        load, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    return _untuned(dataset.prefetch(AUTOTUNE))
