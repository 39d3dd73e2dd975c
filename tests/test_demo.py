import glob
import os

import numpy as np

from trainer import demo


def test_benchmark_photos_are_jpegs_that_compress_like_photographs(tmp_path):
    # The benchmarks' decode work is only realistic if the files are: cats_and_dogs_filtered's
    # 500x375 photos are JPEGs of some tens of KB, where pixel noise would give ~100 KB.
    root = demo.write(str(tmp_path), train_per_class=4, validation_per_class=1,
                      size=(500, 375), classes=demo.CLASSES[:2], photos=True)
    paths = glob.glob(os.path.join(root, "*", "*", "*"))
    assert len(paths) == 10 and all(path.endswith(".jpg") for path in paths)
    assert 20_000 < np.median([os.path.getsize(path) for path in paths]) < 70_000


def test_demo_mixes_jpeg_and_png(tmp_path):
    root = demo.write(str(tmp_path), train_per_class=5, validation_per_class=0,
                      classes=demo.CLASSES[:2])
    names = sorted(os.listdir(os.path.join(root, "train", "circles")))
    assert [name[-4:] for name in names] == [".jpg"] * 4 + [".png"]
