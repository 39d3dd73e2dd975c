"""Image folders in, distributed tf.data pipelines out.

The order of every epoch is a seeded permutation of the file list computed up front, so the
position in the data is a function of the global step alone: resuming at step N (mid-epoch
included) rebuilds exactly the batches that step N would have seen, with no iterator state to
checkpoint. Each epoch is padded to whole global batches by wrapping around its own
permutation, giving static batch shapes (TPU) and every image at least once per epoch.
"""

import dataclasses
import math

from absl import logging
import numpy as np
import tensorflow as tf

from trainer import demo
from trainer import files
from trainer.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
AUTOTUNE = tf.data.AUTOTUNE
DATASET_INFO = "dataset_info.json"         # marks a folder written by trainer.prepare
PREPARED_FORMAT = "trainer-tfrecord-v1"
_RECORD_FEATURES = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
                    "image/label": tf.io.FixedLenFeature([], tf.int64),
                    "image/index": tf.io.FixedLenFeature([], tf.int64)}


@dataclasses.dataclass
class Split:
    paths: np.ndarray   # str paths of the images, local or gs:// (names, for TFDS)
    labels: np.ndarray  # int32 class indices
    shards: list = None  # TFRecord files holding the images in this order; None: read paths
    tfds: tuple = None   # (builder, split name) of a TensorFlow Datasets split instead

    def __len__(self):
        return len(self.paths)

    @property
    def is_stream(self):
        """Read as a stream of records rather than image files by path."""
        return self.shards is not None or self.tfds is not None


@dataclasses.dataclass
class ImageFolder:
    root: str
    class_names: list
    train: Split
    validation: Split
    validation_source: str  # "validation/" or how it was held out of train/
    skipped: list           # paths that could not be decoded


def decode_and_resize(contents, image_size):
    """Encoded bytes of any supported format to float32 RGB in 0..255, image_size square.

    Shared by training and the exported serving signature, so both see identical pixels.
    Grayscale, RGBA, 16-bit and palette images come out as 8-bit RGB; a GIF gives its first
    frame.
    """
    image = tf.io.decode_image(contents, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return tf.image.resize(image, [image_size, image_size])


def decode_batch(sources, image_size, read_files):
    """decode_and_resize over a batch of encoded images (or of paths, read_files=True), for
    training and serving.

    Each tf.data function call costs 20-40 us of CPU on a 2-core machine, more than reading a
    local file. One call a batch instead of one an image took the CPU time per image of
    scripts/bench_input.py's photos from 1.45-1.55 ms to 1.25 ms (TFRecords) and 1.15 (files).
    """
    def one(source):
        return decode_and_resize(tf.io.read_file(source) if read_files else source, image_size)

    return tf.map_fn(one, sources,
                     fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))


def _list_images(folder):
    return [files.join(folder, name) for name in files.listdir(folder)
            if name.lower().endswith(IMAGE_EXTENSIONS)]


def _class_folders(split_root):
    names = [name for name in files.listdir(split_root) if files.isdir(files.join(split_root, name))]
    if len(names) < 2:
        raise UserError(f"{split_root} holds {len(names)} class folder(s) {names}; a classifier "
                        "needs at least 2 (one folder of images per class)")
    return names


def _list_split(split_root, class_names):
    paths, labels = [], []
    for label, name in enumerate(class_names):
        images = _list_images(files.join(split_root, name))
        if not images:
            raise UserError(f"class folder {files.join(split_root, name)} holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
        paths += images
        labels += [label] * len(images)
    return Split(np.array(paths), np.array(labels, dtype=np.int32))


def find_unreadable(paths):
    """Indices of files TensorFlow's decoders reject, found with the decoder training uses."""
    def check(index, path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return index, tf.shape(image)[0]

    dataset = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths))
    dataset = dataset.map(check, num_parallel_calls=AUTOTUNE, deterministic=False)
    dataset = dataset.ignore_errors().batch(1024)
    readable = np.zeros(len(paths), dtype=bool)
    for indices, _ in dataset.as_numpy_iterator():
        readable[indices] = True
    return np.flatnonzero(~readable)


def _drop_unreadable(split, split_root, class_names):
    bad = find_unreadable(split.paths)
    kept = Split(np.delete(split.paths, bad), np.delete(split.labels, bad))
    for label, name in enumerate(class_names):
        if not np.any(kept.labels == label):
            raise UserError(f"class folder {files.join(split_root, name)} holds no readable "
                            "image; fix or remove it")
    return kept, [str(path) for path in split.paths[bad]]


def _stratified_split(split, fraction, seed):
    """Holds out `fraction` of each class, chosen by seed, keeping at least one to train on."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(split), dtype=bool)
    for label in np.unique(split.labels):
        members = rng.permutation(np.flatnonzero(split.labels == label))
        count = min(len(members) - 1, max(1, round(len(members) * fraction)))
        held[members[:count]] = True
    return (Split(split.paths[~held], split.labels[~held]),
            Split(split.paths[held], split.labels[held]))


def _load_prepared(root):
    """A dataset written by trainer.prepare: its shards, and each record's path and label."""
    info = files.read_json(files.join(root, DATASET_INFO))
    if info.get("format") != PREPARED_FORMAT:
        raise UserError(f"{root}/{DATASET_INFO} is not of format {PREPARED_FORMAT}: prepare the "
                        "data again with python -m trainer.prepare")
    splits = {}
    for name in ("train", "validation"):
        index = files.read_json(files.join(root, f"{name}-index.json"))
        splits[name] = Split(np.array(index["paths"]), np.array(index["labels"], dtype=np.int32),
                             [files.join(root, shard) for shard in info["splits"][name]["shards"]])
    return ImageFolder(root, info["class_names"], splits["train"], splits["validation"],
                       f"prepared TFRecords ({info['validation_source']})",
                       [entry["path"] for entry in info["skipped"]])


def _tfds_stream(builder, split, shuffle_files=False, read_config=None):
    """(encoded image, label, key) of a TFDS split, images left encoded."""
    import tensorflow_datasets as tfds
    image_key, label_key = builder.info.supervised_keys
    dataset = builder.as_dataset(split, shuffle_files=shuffle_files, read_config=read_config,
                                 decoders={image_key: tfds.decode.SkipDecoding()})
    return dataset.map(lambda example: (example[image_key],
                                        tf.cast(example[label_key], tf.int32),
                                        example.get("tfds_id", tf.constant(""))))


def _load_tfds(name, options, validation_split):
    """A TensorFlow Datasets dataset prepared in options['data_dir'] (local or gs://)."""
    import tensorflow_datasets as tfds
    data_dir = options.get("data_dir") or None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared() if hasattr(builder, "is_prepared") else True
    except (tfds.core.registered.DatasetNotFoundError, tf.errors.NotFoundError):
        builder, prepared = None, False
    if not prepared:
        if not options.get("download") or builder is None:
            raise UserError(f"TFDS dataset {name} is not prepared in {data_dir or '~/tensorflow_datasets'}: "
                            "prepare it there (tfds build, or --tfds_download with internet access)")
        builder.download_and_prepare()
    if not builder.info.supervised_keys:
        raise UserError(f"TFDS dataset {name} has no (image, label) supervised keys to train on")
    splits = builder.info.splits
    train, validation = options.get("train_split") or "train", options.get("validation_split")
    if not validation:
        if "validation" in splits:
            validation = "validation"
        else:
            kept = round(100 * (1 - validation_split))
            train, validation = f"{train}[:{kept}%]", f"{train}[{kept}%:]"
    class_names = builder.info.features[builder.info.supervised_keys[1]].names
    result = []
    for split in (train, validation):
        try:
            labels = np.array([int(label) for _, label, _ in _tfds_stream(builder, split)
                               .as_numpy_iterator()], dtype=np.int32)
        except (ValueError, KeyError) as error:
            raise UserError(f"TFDS dataset {name} has no split {split!r} "
                            f"({str(error).splitlines()[0][:120]}); its splits are "
                            f"{', '.join(splits)}") from None
        paths = np.array([f"tfds:{name}/{split}/{i}" for i in range(len(labels))])
        result.append(Split(paths, labels, tfds=(builder, split)))
    return ImageFolder(f"tfds:{name}", list(class_names), result[0], result[1],
                       f"TFDS split {validation}", [])


def scan(root, validation_split=0.2, seed=42, tfds_options=None):
    """Lists and checks an image folder, or opens a prepared one; errors name the folder at
    fault."""
    if root == "demo":
        root = demo.ensure()
    if not root:
        raise UserError("no --data given: pass --data=ROOT with ROOT/train/<class>/ images")
    if root.startswith("tfds:"):
        return _load_tfds(root[len("tfds:"):], tfds_options or {}, validation_split)
    root = root.rstrip("/")
    train_root = files.join(root, "train")
    try:
        if not files.exists(root):
            raise UserError(f"--data={root} does not exist: check the path or bucket name")
        if files.exists(files.join(root, DATASET_INFO)):
            return _load_prepared(root)
        if not files.isdir(train_root):
            raise UserError(f"--data={root} has no train/ folder: expected "
                            f"{root}/train/<class>/*.jpg (and optionally validation/<class>/)")
        class_names = _class_folders(train_root)
        train = _list_split(train_root, class_names)
        validation_root = files.join(root, "validation")
        has_validation = files.isdir(validation_root)
        if has_validation:
            validation_classes = _class_folders(validation_root)
            if validation_classes != class_names:
                raise UserError(f"{validation_root} has classes {validation_classes} but "
                                f"{train_root} has {class_names}; they must match")
            validation = _list_split(validation_root, class_names)
    except tf.errors.OpError as error:
        raise UserError(f"cannot read --data={root}: {error.message.splitlines()[0]}; check "
                        "the path and your access to it") from None
    train, skipped = _drop_unreadable(train, train_root, class_names)
    if has_validation:
        validation, skipped_validation = _drop_unreadable(validation, validation_root, class_names)
        skipped += skipped_validation
        source = "validation/"
    else:
        train, validation = _stratified_split(train, validation_split, seed)
        source = f"{validation_split:.0%} of train/, stratified, seed {seed}"
    if skipped:
        logging.warning("skipped %d unreadable image(s), e.g. %s", len(skipped),
                        ", ".join(skipped[:3]))
    return ImageFolder(root, class_names, train, validation, source, skipped)


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


def _parse_records(records):
    """(encoded images, labels, keys) of a batch of prepared records."""
    example = tf.io.parse_example(records, _RECORD_FEATURES)
    return (example["image/encoded"], tf.cast(example["image/label"], tf.int32),
            tf.strings.as_string(example["image/index"]))


def _ordered_records(split, order, global_batch, context):
    """A prepared split's encoded images and labels at the positions of `order`, which must be
    the records in order, wrapping around (as evaluation_order gives): TFRecords are read
    front to back. Each pipeline keeps the same slices of each global batch as shard()."""
    if not np.array_equal(order, np.resize(np.arange(len(split)), len(order))):
        raise ValueError("a prepared split can be read in record order only")
    per_pipeline = global_batch // context.num_input_pipelines
    if split.tfds:
        stream = _tfds_stream(*split.tfds).map(lambda contents, label, _: (contents, label))
    else:
        stream = tf.data.TFRecordDataset(split.shards).batch(global_batch).map(
            lambda records: _parse_records(records)[:2]).unbatch()
    stream = stream.repeat().take(len(order)).enumerate()
    stream = stream.filter(
        lambda position, _: (position % global_batch) // per_pipeline == context.input_pipeline_id)
    return stream.map(lambda _, example: example)


def pipeline(split, order, weights, global_batch, image_size, context, deterministic=True):
    """One input pipeline's tf.data.Dataset of per-replica (images, labels, weights) batches.

    deterministic=False lets a decoded batch overtake a slower one before it (faster reads
    from remote storage): batches then come in a slightly different order than `order` says."""
    mine = shard(order, global_batch, context)
    if not split.is_stream:
        sources = tf.data.Dataset.from_tensor_slices((split.paths[mine], split.labels[mine]))
    else:
        sources = _ordered_records(split, order, global_batch, context)
    dataset = tf.data.Dataset.zip(
        (sources, tf.data.Dataset.from_tensor_slices(shard(weights, global_batch, context))))
    dataset = dataset.batch(context.get_per_replica_batch_size(global_batch), drop_remainder=True)

    def load(source, weights):
        contents, labels = source
        # Paths are read here, in parallel with decoding (remote reads are slow).
        return decode_batch(contents, image_size, not split.is_stream), labels, weights

    # Shuffling was done on the file list (train_order); by default the parallel map keeps
    # that order, which exact resume and row-indexed outputs (features) rely on.
    dataset = dataset.map(load, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    return dataset.prefetch(AUTOTUNE)


def epoch_records(split, epoch, seed, global_batch, context, deterministic=True):
    """One pipeline's per-replica batches of (encoded images, labels, keys) for one epoch of a
    prepared or TFDS split: steps_per_epoch x its share of the global batch of examples.
    Files are shuffled by (seed, epoch) and divided between pipelines when there are enough of
    them, else the examples are; a seeded shuffle buffer mixes them. Deterministic unless
    asked otherwise, so that a resumed epoch can skip ahead to exactly where it stopped."""
    pipelines, index = context.num_input_pipelines, context.input_pipeline_id
    epoch_seed = seed * 100_003 + epoch
    if split.tfds:
        import tensorflow_datasets as tfds
        builder, name = split.tfds
        by_file = len(builder.info.splits[name].file_instructions) >= pipelines
    else:
        shards = np.array(split.shards)[
            np.random.default_rng([seed, epoch]).permutation(len(split.shards))]
        by_file = len(shards) >= pipelines
    # Sharding by record needs every pipeline to see the records in the same order.
    deterministic = deterministic or not by_file
    if split.tfds:
        options = tf.data.Options()
        options.deterministic = deterministic
        read_config = tfds.ReadConfig(options=options, shuffle_seed=epoch_seed, add_tfds_id=True,
                                      input_context=context if by_file else None)
        examples = _tfds_stream(builder, name, shuffle_files=True, read_config=read_config)
    else:
        if by_file:
            shards = shards[index::pipelines]
        if files.is_remote(shards[0]):
            # Remote reads wait on the network: several shards in flight keep decoding busy.
            examples = tf.data.Dataset.from_tensor_slices(shards).interleave(
                tf.data.TFRecordDataset, cycle_length=min(len(shards), 8),
                num_parallel_calls=AUTOTUNE, deterministic=deterministic)
        else:
            # Local shards are read one after another (prepare already wrote the records in a
            # random order): a parallel interleave's threads cost 0.04 ms of CPU per record,
            # 3% of the decoding they would compete with on a small machine.
            examples = tf.data.TFRecordDataset(shards)
    if not by_file:
        examples = examples.shard(pipelines, index)
    shuffled = examples.shuffle(min(len(split), 4096), seed=epoch_seed,
                                reshuffle_each_iteration=False)
    # The padding to whole global batches comes from the start of the unshuffled stream: a
    # second pass through the shuffle buffer would read the whole split again for a few records.
    steps = steps_per_epoch(len(split), global_batch)
    epoch = shuffled.concatenate(examples.repeat()).take(steps * global_batch // pipelines)
    epoch = epoch.batch(context.get_per_replica_batch_size(global_batch), drop_remainder=True)
    # Parsed a batch at a time: one vectorised parse instead of one per record.
    return epoch if split.tfds else epoch.map(_parse_records)


def training_pipeline(split, first_step, end_step, global_batch, image_size, seed, context,
                      deterministic=True):
    """Per-replica (images, labels, weights) batches for training steps [first_step, end_step).

    Image files follow train_order; prepared and TFDS splits stream epoch_records, skipping
    the steps of the first epoch that were already trained."""
    if not split.is_stream:
        order = train_order(len(split), global_batch, seed, first_step, end_step)
        return pipeline(split, order, np.ones(len(order), np.float32), global_batch,
                        image_size, context, deterministic)
    steps = steps_per_epoch(len(split), global_batch)
    # Batches a step: one per replica this pipeline feeds.
    per_step = context.num_replicas_in_sync // context.num_input_pipelines
    records = None
    for epoch in range(first_step // steps, math.ceil(end_step / steps)):
        start, end = max(first_step - epoch * steps, 0), min(end_step - epoch * steps, steps)
        epoch_part = epoch_records(split, epoch, seed, global_batch, context,
                                   deterministic).skip(start * per_step).take(
            (end - start) * per_step)
        records = epoch_part if records is None else records.concatenate(epoch_part)

    def load(contents, labels, _):
        weights = tf.ones_like(labels, tf.float32)
        return decode_batch(contents, image_size, read_files=False), labels, weights

    # Encoded batches read ahead keep decoding busy while the next epoch fills its shuffle
    # buffer (it reads up to 4096 records before handing out the first).
    dataset = records.prefetch(4 * per_step).map(
        load, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    return dataset.prefetch(AUTOTUNE)


def array_pipeline(array, labels, order, weights, global_batch, context):
    """Like pipeline(), over examples already computed: backbone features or decoded images
    (an array or memmap, one row per example)."""
    per_replica = context.get_per_replica_batch_size(global_batch)
    dataset = tf.data.Dataset.from_tensor_slices(
        (shard(order, global_batch, context), shard(weights, global_batch, context)))
    dataset = dataset.batch(per_replica, drop_remainder=True)

    def gather(indices, batch_weights):
        rows, batch_labels = tf.numpy_function(
            lambda i: (array[i], labels[i]), [indices], [tf.float32, tf.int32])
        rows.set_shape([per_replica, *array.shape[1:]])
        batch_labels.set_shape([per_replica])
        return rows, batch_labels, batch_weights

    return dataset.map(gather).prefetch(AUTOTUNE)


def distribute(strategy, global_batch, make_pipeline):
    """A distributed dataset from make_pipeline(input_context), one pipeline per worker."""
    if global_batch % strategy.num_replicas_in_sync:
        raise UserError(f"--batch_size={global_batch} is global and must divide evenly over "
                        f"{strategy.num_replicas_in_sync} replicas")
    return strategy.distribute_datasets_from_function(make_pipeline)


IMBALANCE_RATIO = 1.5


def imbalance(split, class_names):
    """A warning when the largest class outnumbers the smallest by IMBALANCE_RATIO, else None."""
    counts = np.bincount(split.labels, minlength=len(class_names))
    if counts.max() <= IMBALANCE_RATIO * max(1, counts.min()):
        return None
    listing = ", ".join(f"{name} {count}" for name, count in zip(class_names, counts))
    return (f"class imbalance in train: {listing} (largest/smallest {counts.max() / max(1, counts.min()):.1f}); "
            "consider --class_weight=auto")


def class_weights(split, num_classes):
    """total / (classes x count) per class: each class contributes equally to the loss."""
    counts = np.bincount(split.labels, minlength=num_classes).astype(np.float32)
    return len(split) / (num_classes * np.maximum(counts, 1))


def describe(folder):
    counts = lambda split: ", ".join(
        f"{name} {int(np.sum(split.labels == label))}" for label, name in enumerate(folder.class_names))
    return (f"data {folder.root}: {len(folder.class_names)} classes; train {len(folder.train)} "
            f"({counts(folder.train)}); validation {len(folder.validation)} "
            f"({counts(folder.validation)}) from {folder.validation_source}; "
            f"{len(folder.skipped)} unreadable skipped")
