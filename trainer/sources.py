"""Where the examples come from: an image folder, a folder written by trainer.prepare, or a
TensorFlow Datasets dataset, each opened into the same Source of train and validation splits.

A Split lists its examples (paths, or names for records) and labels up front, so that every
pipeline can fix the order of an epoch before reading anything (see pipelines.py).
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import posixpath
import struct

from absl import logging
import numpy as np
import tensorflow as tf

from trainer import files
from trainer import progress
from trainer import records
from trainer.errors import UserError, first_line, op_reason

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
IMBALANCE_RATIO = 1.5


@dataclasses.dataclass
class Split:
    paths: np.ndarray   # str paths of the images, local or gs:// (names, for TFDS)
    labels: np.ndarray  # int32 class indices
    shards: list = None  # TFRecord files holding the images in this order; None: read paths
    tfds: tuple = None   # (builder, split name) of a TensorFlow Datasets split instead
    stamps: np.ndarray = None  # what the listing says of each image file (files.stamps)

    def subset(self, keep):
        """The split of the image files `keep` (a mask or indices) selects."""
        return Split(self.paths[keep], self.labels[keep],
                     stamps=None if self.stamps is None else self.stamps[keep])

    def __len__(self):
        return len(self.paths)

    @property
    def is_stream(self):
        """Read as a stream of records rather than image files by path."""
        return self.shards is not None or self.tfds is not None

    def class_counts(self, num_classes):
        return np.bincount(self.labels, minlength=num_classes)


@dataclasses.dataclass
class Source:
    root: str
    class_names: list
    train: Split
    validation: Split
    validation_source: str  # "validation/" or how it was held out of train/
    skipped: list           # paths of the images left out
    skip_reasons: dict = dataclasses.field(default_factory=dict)  # path: why it was left out
    # Whether the images were checked: an image folder is listed without reading a file, and
    # the files that cannot be read or decoded are found by the first pass that reads them.
    checked: bool = True


def scan(root, validation_split=0.2, seed=42, tfds_options=None):
    """Opens --data: lists an image folder (reading no image: see check and drop), or opens a
    prepared or TFDS dataset; errors name the folder at fault."""
    if not root:
        raise UserError("no --data given: pass --data=ROOT with ROOT/train/<class>/ images")
    if root.startswith("tfds:"):
        return _open_tfds(root[len("tfds:"):], tfds_options or {}, validation_split)
    root = root.rstrip("/")
    files.check_reachable(root)
    try:
        if not files.exists(root):
            raise UserError(f"--data={root} does not exist: check the path or bucket name")
        if files.exists(files.join(root, records.DATASET_INFO)):
            return _open_prepared(root)
        if any(records.written_first(name) for name in files.listdir(root)):
            raise UserError(f"--data={root} is an incomplete trainer.prepare output (no "
                            f"{records.DATASET_INFO}): run prepare again")
        class_names, train, validation = _list_image_folder(root)
    except tf.errors.OpError as error:
        raise UserError(f"cannot read --data={root}: {first_line(error.message)}; check "
                        "the path and your access to it") from None
    except Exception as error:  # google-cloud-storage's, listing a gs:// folder
        if type(error).__module__.startswith("google."):
            raise UserError(f"cannot list --data={root}: {first_line(error)}; check the path "
                            "and your access to it") from None
        raise
    if validation is not None:
        held_out = "validation/"
    else:
        _need_held_out(validation_split, f"--data={root} has no validation/ folder")
        train, validation = _stratified_split(train, validation_split, seed)
        held_out = f"{validation_split:.0%} of train/, stratified, seed {seed}"
    return Source(root, class_names, train, validation, held_out, [], checked=False)


# -- image folders ---------------------------------------------------------------------------

def _list_images(folder, report):
    """(paths, stamps) of the images in a folder, from one listing."""
    listed = sorted((name, stamp) for name, stamp in files.stamps(folder, report).items()
                    if name.lower().endswith(IMAGE_EXTENSIONS))
    return [files.join(folder, name) for name, _ in listed], [stamp for _, stamp in listed]


def _class_folders(split_root):
    names = [name for name in files.listdir(split_root) if files.isdir(files.join(split_root, name))]
    if len(names) < 2:
        raise UserError(f"{split_root} holds {len(names)} class folder(s) {names}; a classifier "
                        "needs at least 2 (one folder of images per class)")
    return names


def _list_split(split_root, class_names, report):
    paths, labels, stamps = [], [], []
    for label, name in enumerate(class_names):
        images, image_stamps = _list_images(files.join(split_root, name), report)
        if not images:
            raise UserError(f"class folder {files.join(split_root, name)} holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
        paths += images
        stamps += image_stamps
        labels += [label] * len(images)
    return Split(np.array(paths), np.array(labels, dtype=np.int32), stamps=np.array(stamps))


def _list_image_folder(root):
    """(class names, train split, validation split or None) as listed, nothing read yet."""
    train_root = files.join(root, "train")
    if not files.isdir(train_root):
        raise UserError(f"--data={root} has no train/ folder: expected "
                        f"{root}/train/<class>/*.jpg (and optionally validation/<class>/)")
    class_names = _class_folders(train_root)
    report = progress.Report(f"files listed in {root}", None)  # a line every 30 s
    train = _list_split(train_root, class_names, report)
    validation_root = files.join(root, "validation")
    validation = None
    if files.isdir(validation_root):
        validation_classes = _class_folders(validation_root)
        if validation_classes != class_names:
            raise UserError(f"{validation_root} has classes {validation_classes} but "
                            f"{train_root} has {class_names}; they must match")
        validation = _list_split(validation_root, class_names, report)
    report.done()
    return class_names, train, validation


def _need_held_out(validation_split, why):
    if not validation_split:
        raise UserError(f"{why}, and --validation_split=0 holds nothing out to validate on: "
                        "give a fraction such as 0.2, or add the validation data")


def check(source, max_pixels, retry_seconds):
    """The source without the images that cannot be read, decoded or are too large, found by
    reading every image: for the jobs that have no pass over the images to find them in
    (streaming them every epoch), and for trainer.prepare."""
    if source.checked:
        return source
    return drop(source, {name: find_unreadable(getattr(source, name).paths, max_pixels,
                                               retry_seconds)
                         for name in SPLITS})


SPLITS = ("train", "validation")


def drop(source, bad):
    """The checked source, without the images `bad` ({split name: {index: why}}) names."""
    splits, skipped = {}, []
    for name in SPLITS:
        split, why = getattr(source, name), bad.get(name, {})
        drop_ = sorted(why)
        kept = split.subset(np.setdiff1d(np.arange(len(split)), drop_))
        for label, count in enumerate(kept.class_counts(len(source.class_names))):
            if not count:
                folder = posixpath.dirname(split.paths[split.labels == label][0])
                raise UserError(f"class folder {folder} holds no readable image for {name}; "
                                "fix or remove it")
        splits[name] = kept
        skipped += [(str(split.paths[index]), why[index]) for index in drop_]
    if skipped:
        logging.warning("skipped %d image(s): %s", len(skipped), "; ".join(
            f"{count} {why}" for why, count in collections.Counter(
                why for _, why in skipped).items()))
    return dataclasses.replace(source, train=splits["train"], validation=splits["validation"],
                               skipped=[path for path, _ in skipped], skip_reasons=dict(skipped),
                               checked=True)


def read_checked(path, max_pixels, retry_seconds):
    """(the file's bytes, None), or (None, why it is to be skipped): it cannot be read (a
    dangling link, a folder named like an image), has too many pixels (read from the header,
    never decoded), or the decoder training uses rejects it. A read that storage fails
    transiently is retried for up to retry_seconds, never counted as a bad image."""
    try:
        content = files.retrying(lambda: files.read_bytes(path), retry_seconds,
                                 f"reading {path}")
    except tf.errors.OpError as error:  # not transient: a dangling link, a folder, ...
        # TensorFlow's message is "PATH; reason": the reason alone, so that files
        # skipped for the same one are counted together.
        return None, f"cannot be read ({op_reason(error).rpartition('; ')[2]})"
    try:
        pixels = header_pixels(content)
        if pixels is not None and pixels > max_pixels:
            return None, f"more than --max_image_pixels={max_pixels} pixels"
        tf.io.decode_image(content, channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError:
        return None, "cannot be decoded"
    return content, None


def in_windows(pool, function, items, window=None):
    """pool.map(function, items), a window of items at a time: the work in flight stays
    bounded, so that a million files do not make a million futures at once."""
    window = window or CHECK_WINDOW
    for start in range(0, len(items), window):
        yield from pool.map(function, items[start:start + window])


def find_unreadable(paths, max_pixels, retry_seconds):
    """{index: why} of the files to skip (see read_checked)."""
    # Threads: remote reads wait on the network, and TensorFlow's decoder releases the GIL. A
    # few, since each may hold a decoded image of up to max_pixels.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        checked = in_windows(pool, lambda path: read_checked(path, max_pixels,
                                                             retry_seconds)[1], list(paths))
        return {index: why for index, why in enumerate(checked) if why}


CHECK_WINDOW = 1024


def header_pixels(content):
    """Width x height from an image file's header, without decoding it; None for a header this
    does not know, which the decoder then judges."""
    if content[:8] == b"\x89PNG\r\n\x1a\n" and len(content) >= 24:
        width, height = struct.unpack(">II", content[16:24])
    elif content[:6] in (b"GIF87a", b"GIF89a") and len(content) >= 10:
        width, height = struct.unpack("<HH", content[6:10])
    elif content[:2] == b"BM" and len(content) >= 26:
        width, height = struct.unpack("<ii", content[18:26])
    elif content[:2] == b"\xff\xd8":
        height, width, _ = tf.image.extract_jpeg_shape(content).numpy()
    else:
        return None
    return abs(int(width) * int(height))


def _stratified_split(split, fraction, seed):
    """Holds out `fraction` of each class, chosen by seed, keeping at least one to train on."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(split), dtype=bool)
    for label in np.unique(split.labels):
        members = rng.permutation(np.flatnonzero(split.labels == label))
        count = min(len(members) - 1, max(1, round(len(members) * fraction)))
        held[members[:count]] = True
    return split.subset(~held), split.subset(held)


# -- prepared TFRecords ----------------------------------------------------------------------

def _open_prepared(root):
    """A dataset written by trainer.prepare: its shards, and each record's path and label."""
    info = files.read_json(files.join(root, records.DATASET_INFO))
    if info.get("format") != records.FORMAT:
        raise UserError(f"{root}/{records.DATASET_INFO} is not of format {records.FORMAT}: "
                        "prepare the data again with python -m trainer.prepare")
    splits = {}
    for name in ("train", "validation"):
        index = files.read_json(files.join(root, f"{name}-index.json"))
        splits[name] = Split(np.array(index["paths"]), np.array(index["labels"], dtype=np.int32),
                             [files.join(root, shard) for shard in info["splits"][name]["shards"]])
    return Source(root, info["class_names"], splits["train"], splits["validation"],
                  f"prepared TFRecords ({info['validation_source']})",
                  [entry["path"] for entry in info["skipped"]],
                  {entry["path"]: entry["reason"] for entry in info["skipped"]})


# -- TensorFlow Datasets ---------------------------------------------------------------------

def tfds_examples(builder, split, shuffle_files=False, read_config=None):
    """(encoded image, label, key) of a TFDS split, images left encoded."""
    import tensorflow_datasets as tfds
    image_key, label_key = builder.info.supervised_keys
    dataset = builder.as_dataset(split, shuffle_files=shuffle_files, read_config=read_config,
                                 decoders={image_key: tfds.decode.SkipDecoding()})
    return dataset.map(lambda example: (example[image_key],
                                        tf.cast(example[label_key], tf.int32),
                                        example.get("tfds_id", tf.constant(""))))


def _tfds_builder(name, options):
    """The builder of a prepared TFDS dataset; prepares it only when --tfds_download allows."""
    import tensorflow_datasets as tfds
    data_dir = options.get("data_dir") or None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared() if hasattr(builder, "is_prepared") else True
    except (tfds.core.registered.DatasetNotFoundError, tf.errors.NotFoundError):
        builder, prepared = None, False
    if not prepared:
        if not options.get("download") or builder is None:
            raise UserError(f"TFDS dataset {name} is not prepared in "
                            f"{data_dir or '~/tensorflow_datasets'}: prepare it there (tfds "
                            "build, or --tfds_download with internet access)")
        builder.download_and_prepare()
    if not builder.info.supervised_keys:
        raise UserError(f"TFDS dataset {name} has no (image, label) supervised keys to train on")
    return builder


def _open_tfds(name, options, validation_split):
    """A TensorFlow Datasets dataset prepared in options['data_dir'] (local or gs://)."""
    builder = _tfds_builder(name, options)
    splits = builder.info.splits
    train, validation = options.get("train_split") or "train", options.get("validation_split")
    if not validation:
        if "validation" in splits:
            validation = "validation"
        else:
            _need_held_out(validation_split, f"TFDS dataset {name} has no validation split")
            kept = round(100 * (1 - validation_split))
            train, validation = f"{train}[:{kept}%]", f"{train}[{kept}%:]"
    class_names = builder.info.features[builder.info.supervised_keys[1]].names
    result = []
    for split in (train, validation):
        try:
            labels = np.array([int(label) for _, label, _ in tfds_examples(builder, split)
                               .as_numpy_iterator()], dtype=np.int32)
        except (ValueError, KeyError) as error:
            raise UserError(f"TFDS dataset {name} has no split {split!r} "
                            f"({first_line(error, 120)}); its splits are "
                            f"{', '.join(splits)}") from None
        paths = np.array([f"tfds:{name}/{split}/{i}" for i in range(len(labels))])
        result.append(Split(paths, labels, tfds=(builder, split)))
    return Source(f"tfds:{name}", list(class_names), result[0], result[1],
                  f"TFDS split {validation}", [])


def fingerprint(split):
    """A digest of what a split's examples are, in order: for image files their paths,
    labels and stamps (what the listing says of the content: files.stamps); for TFRecord shards, the records' paths and labels and the
    shards' names and sizes; for TFDS, the split and the prepared dataset's info."""
    digest = hashlib.sha256()
    digest.update(json.dumps([split.paths.tolist(), split.labels.tolist()]).encode())
    if split.tfds is not None:
        builder, name = split.tfds
        digest.update(json.dumps([str(name), builder.info.as_json]).encode())
    elif split.shards is not None:
        digest.update(json.dumps([[shard, tf.io.gfile.stat(shard).length]
                                  for shard in split.shards]).encode())
    else:
        digest.update(json.dumps(split.stamps.tolist()).encode())
    return digest.hexdigest()


# -- what the data says about the job --------------------------------------------------------

def imbalance(split, class_names):
    """A warning when the largest class outnumbers the smallest by IMBALANCE_RATIO, else None."""
    counts = split.class_counts(len(class_names))
    if counts.max() <= IMBALANCE_RATIO * max(1, counts.min()):
        return None
    listing = ", ".join(f"{name} {count}" for name, count in zip(class_names, counts))
    return (f"class imbalance in train: {listing} (largest/smallest "
            f"{counts.max() / max(1, counts.min()):.1f}); consider --class_weight=auto")


def class_weights(split, num_classes):
    """total / (classes x count) per class: each class contributes equally to the loss."""
    counts = split.class_counts(num_classes).astype(np.float32)
    return len(split) / (num_classes * np.maximum(counts, 1))


def describe(source):
    def counts(split):
        return ", ".join(f"{name} {count}" for name, count in
                         zip(source.class_names, split.class_counts(len(source.class_names))))
    return (f"data {source.root}: {len(source.class_names)} classes; train {len(source.train)} "
            f"({counts(source.train)}); validation {len(source.validation)} "
            f"({counts(source.validation)}) from {source.validation_source}; " + (
                f"{len(source.skipped)} skipped (unreadable or too large)" if source.checked
                else "as listed: images that cannot be read are left out when first read"))
