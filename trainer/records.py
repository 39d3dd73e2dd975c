"""The TFRecord format trainer.prepare writes and the input pipelines read: one home for the
schema.

A prepared folder holds `<split>-NNNNN-of-NNNNN.tfrecord` shards of tf.train.Examples with
these features, `<split>-index.json` (each record's source path and label, in record order),
`labels.txt`, and last DATASET_INFO, whose presence marks the folder as prepared.
"""

import tensorflow as tf

DATASET_INFO = "dataset_info.json"
FORMAT = "trainer-tfrecord-v1"
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
