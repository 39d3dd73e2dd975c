"""What the job computes once and keeps, and where.

Without random augmentation, what the frozen part of the model computes from an image never
changes: one backbone pass gives the pooled features phase 1 trains the head on, and the
activations at the cut below --fine_tune_at that phase 2 trains the top on (model.cut).
phase_inputs decides, before training, what each phase reads; Store holds the arrays, in
memory while --memory_budget_mb lasts and in files in the local temp dir beyond it.
"""

import dataclasses
import os
import tempfile

import numpy as np

from trainer import model


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a phase trains on; decided before training, shown by --dry_run and the log."""
    cached: bool       # computed once by the backbone pass, not read from images every epoch
    description: str


def fine_tune_cut(config, classifier, fine_tune_at):
    """The model.Cut phase 2 trains above, or None when it reads images."""
    if config.fine_tune_epochs and config.caches_features():
        return model.cut(classifier, fine_tune_at)
    return None


def phase_inputs(config, cut):
    """{phase name: Inputs}. cut: fine_tune_cut()'s."""
    if config.cache_features == "off":
        images = "images every epoch (--cache_features=off)"
    elif config.augmentations():
        images = ("images every epoch: --augment changes them each time, so the backbone's "
                  "outputs cannot be cached")
    else:
        images = None
    head = Inputs(False, images) if images else Inputs(
        True, "pooled backbone features, cached in one backbone pass: the head trains on them")
    if images:
        fine_tune = Inputs(False, images)
    elif cut is None:
        fine_tune = Inputs(False, "images every epoch: no frozen backbone layer below "
                                  "--fine_tune_at to cache the outputs of")
    else:
        shapes = " + ".join("x".join(map(str, shape)) for shape in cut.shapes)
        fine_tune = Inputs(True, f"the activations entering backbone layer {cut.layer} "
                                 f"({shapes}, {cut.bytes_per_image(2) / 1024:.1f} KB an image "
                                 "as float16), cached in the same pass: the layers from there "
                                 "up, the pooling and the head run on them")
    return {"head": head, "fine_tune": fine_tune}


class Store:
    """Arrays of cached inputs or decoded images, one row an example: in memory while the
    budget lasts, else memory-mapped files in the local temp dir, removed by close()."""

    def __init__(self, budget_bytes):
        self.memory_left = budget_bytes
        self._files = []

    def allocate(self, shape, dtype):
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if size <= self.memory_left:
            self.memory_left -= size
            return np.zeros(shape, dtype)
        handle, path = tempfile.mkstemp(prefix="trainer-features-", suffix=".npy")
        os.close(handle)
        self._files.append(path)
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def copy(self, array, dtype):
        copy = self.allocate(array.shape, dtype)
        copy[:] = array
        return copy

    def close(self):
        for path in self._files:
            if os.path.exists(path):
                os.remove(path)
        self._files = []


def fits_float16(values):
    """Whether float16 holds a batch of activations as well as it holds any: to within its
    rounding (2^-11 of a value, 2^-10 here for slack) of the batch's largest magnitude. Values
    past 65504 overflow; a batch of tiny ones (a backbone without trained weights gives 1e-9)
    falls below float16's normal range and loses its digits."""
    scale = float(np.abs(values).max())
    if scale == 0:
        return True
    with np.errstate(over="ignore"):
        error = np.abs(values.astype(np.float16).astype(np.float32) - values).max()
    return bool(error <= scale * 2**-10)
