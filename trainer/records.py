"""The TFRecord format trainer.prepare writes and the input pipelines read: one home for the
schema.

A prepared folder holds `<split>-NNNNN-of-NNNNN.tfrecord` shards of tf.train.Examples with
these features, `<split>-index.json` (each record's source path and label, in record order),
`labels.txt`, and last DATASET_INFO, whose presence marks the folder as prepared.
"""

import re

import tensorflow as tf

DATASET_INFO = "dataset_info.json"
FORMAT = "trainer-tfrecord-v1"
# The files prepare writes before DATASET_INFO: without it, a folder holding them is a
# conversion that never finished.
_WRITTEN_FIRST = re.compile(r"(train|validation)-(\d{5}-of-\d{5}\.tfrecord|index\.json)")


def written_first(name):
    """Whether a file name is one of the shards or indexes prepare writes before DATASET_INFO."""
    return bool(_WRITTEN_FIRST.fullmatch(name))
FEATURES = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
            "image/label": tf.io.FixedLenFeature([], tf.int64),
            "image/index": tf.io.FixedLenFeature([], tf.int64)}


def serialize(content, label, index):
    """One record: the encoded image, its class index and its position in the split."""
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[content])),
        "image/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "image/index": tf.train.Feature(int64_list=tf.train.Int64List(value=[index])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse_batch(records):
    """(encoded images, labels, keys) of a batch of records, parsed in one vectorised call."""
    example = tf.io.parse_example(records, FEATURES)
    return (example["image/encoded"], tf.cast(example["image/label"], tf.int32),
            tf.strings.as_string(example["image/index"]))
