"""python tests/tiny_tfds.py DATA_DIR: writes the TFDS dataset `tiny_shapes` into DATA_DIR
(local or gs://), as `tfds build` would: 24 images, red or green squares, split `train`."""

import sys

import numpy as np
import tensorflow_datasets as tfds


class TinyShapes(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, supervised_keys=("image", "label"),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["red", "green"])}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(24)}

    def _generate_examples(self, count):
        rng = np.random.default_rng(0)
        for index in range(count):
            label = index % 2
            image = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            image[8:24, 8:24, label] = 220
            yield index, {"image": image, "label": label}


if __name__ == "__main__":
    TinyShapes(data_dir=sys.argv[1]).download_and_prepare(file_format="tfrecord")
