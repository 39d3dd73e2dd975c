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


@dataclasses.dataclass
class Split:
    paths: np.ndarray   # str paths, local or gs://
    labels: np.ndarray  # int32 class indices

    def __len__(self):
        return len(self.paths)


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


def scan(root, validation_split=0.2, seed=42):
    """Lists and checks an image folder; errors name the folder at fault."""
    if root == "demo":
        root = demo.ensure()
    if not root:
        raise UserError("no --data given: pass --data=ROOT with ROOT/train/<class>/ images")
    train_root = files.join(root, "train")
    try:
        if not files.exists(root):
            raise UserError(f"--data={root} does not exist: check the path or bucket name")
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


def pipeline(split, order, weights, global_batch, image_size, context):
    """One input pipeline's tf.data.Dataset of per-replica (images, labels, weights) batches."""
    mine = shard(order, global_batch, context)
    dataset = tf.data.Dataset.from_tensor_slices(
        (split.paths[mine], split.labels[mine], shard(weights, global_batch, context)))

    def load(path, label, weight):
        return decode_and_resize(tf.io.read_file(path), image_size), label, weight

    # The map keeps its order (resume and the validation padding rely on it) while decoding in
    # parallel; shuffling was done on the file list (train_order).
    dataset = dataset.map(load, num_parallel_calls=AUTOTUNE)
    dataset = dataset.batch(context.get_per_replica_batch_size(global_batch), drop_remainder=True)
    return dataset.prefetch(AUTOTUNE)


def feature_pipeline(features, labels, order, weights, global_batch, context):
    """Like pipeline(), over stored backbone features (an array or memmap, one row per example)."""
    per_replica = context.get_per_replica_batch_size(global_batch)
    dataset = tf.data.Dataset.from_tensor_slices(
        (shard(order, global_batch, context), shard(weights, global_batch, context)))
    dataset = dataset.batch(per_replica, drop_remainder=True)

    def gather(indices, batch_weights):
        rows, batch_labels = tf.numpy_function(
            lambda i: (features[i], labels[i]), [indices], [tf.float32, tf.int32])
        rows.set_shape([per_replica, features.shape[1]])
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
