"""python -m tests.programs.imagenet_from_keras_home: writes a MobileNetV2 weights file under
the name Keras downloads it as, into $KERAS_HOME/models, then builds the backbone with
weights='imagenet' and checks that it loaded that file, with no network. A program of its own
because Keras reads KERAS_HOME once, at import."""

import os

import h5py
import keras
from keras.src.legacy.saving import legacy_h5_format
import numpy as np

from trainer import model

NAME = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"


def main():
    keras.utils.set_random_seed(1)
    source = keras.applications.MobileNetV2(input_shape=(96, 96, 3), include_top=False,
                                            weights=None)
    folder = os.path.join(os.environ["KERAS_HOME"], "models")
    os.makedirs(folder)
    with h5py.File(os.path.join(folder, NAME), "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, source)
    loaded = model.build_backbone("mobilenet_v2", "imagenet", 96)
    assert all(np.array_equal(a.numpy(), b.numpy())
               for a, b in zip(loaded.weights, source.weights))
    print("loaded", len(loaded.weights))


if __name__ == "__main__":
    main()
