"""Where what the job computes once is kept: the storage, not the policy.

Store holds the arrays of cached inputs or decoded images, in memory while --memory_budget_mb
lasts and in files in the local temp dir beyond it. A --feature_cache entry is those arrays
under a key (the backbone, its weights, preprocessing, precision, the data): encoded,
checked when decoded, and published to a SharedCache folder so that the first of several
writers wins. What each phase trains on, and when the pass runs, is phase_data.py's.
It may not build models or pipelines, nor decide what a phase reads.
"""

import hashlib
import json
import os
import tempfile

import numpy as np

from trainer import buckets
from trainer import files
from trainer import model
from trainer import pipelines
from trainer import sources


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


# -- --feature_cache: what the backbone pass gives, kept for later jobs ---------------------

FORMAT = "trainer-feature-cache-v1"
_MAGIC = FORMAT.encode() + b"\n"
SPLITS = ("train", "validation")


class Damaged(Exception):
    """An entry that cannot be trusted: cut short, altered, or of another key."""


def weights_digest(keras_model):
    """A digest of every weight (BatchNorm statistics included) of a model."""
    digest = hashlib.sha256()
    for weight in keras_model.weights:
        value = np.ascontiguousarray(weight.numpy())
        digest.update(f"{value.dtype}{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def common_key(config, policy, source):
    """The part of every entry's key that is the job's: the backbone, image size, pixels and
    preprocessing, precision, library versions, and the data (sources.fingerprint)."""
    import keras
    import tensorflow as tf
    preprocess = model.lookup(config.backbone).preprocess
    return {"backbone": config.backbone, "image_size": config.image_size,
            "preprocessing": [pipelines.PIXELS,
                              f"{preprocess.__module__}.{preprocess.__qualname__}"],
            "precision": policy, "tensorflow": tf.__version__, "keras": keras.__version__,
            "data": {name: sources.fingerprint(getattr(source, name)) for name in SPLITS}}


_POOLED = "pooled backbone features"


def describe(key):
    what = ("backbone features" if key["outputs"] == _POOLED else
            f"activations entering layer {key['outputs']['cut_at_layer']}")
    return f"{what} of {key['backbone']} at {key['image_size']} px"


def entry_key(common, phase, computing, cut):
    """Everything that determines what the backbone pass gives `phase`: the job-wide `common`
    part (backbone, image size, preprocessing, precision, versions, data fingerprints) and the
    weights of `computing`, the model that computes it, with the outputs asked of it."""
    outputs = (_POOLED if phase == "head" else
               {"cut_at_layer": cut.layer, "shapes": [list(shape) for shape in cut.shapes]})
    return {"format": FORMAT, **common, "outputs": outputs,
            "weights": weights_digest(computing)}


def entry_name(key):
    """The entry's file name: the backbone and image size for people, a hash of the key."""
    text = json.dumps(key, sort_keys=True)
    kind = "features" if key["outputs"] == _POOLED else "activations"
    return (f"{key['backbone']}-{key['image_size']}px-{kind}-"
            f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.bin")


def encode(key, splits):
    """An entry's bytes: a header (the key, and each array's dtype, shape and hash), then the
    arrays. splits: [train arrays, validation arrays]."""
    arrays = [np.ascontiguousarray(array) for split in splits for array in split]
    header = {"key": key, "arrays": [
        {"split": name, "dtype": array.dtype.name, "shape": list(array.shape),
         "sha256": hashlib.sha256(array.data).hexdigest()}
        for name, split in zip(SPLITS, splits) for array in split]}
    text = json.dumps(header).encode()
    return b"".join([_MAGIC, len(text).to_bytes(8, "little"), text,
                     *(array.tobytes() for array in arrays)])


def decode(content, key):
    """[train arrays, validation arrays] of an entry's bytes; raises Damaged when they are
    not exactly what encode(key, ...) wrote."""
    if not content.startswith(_MAGIC):
        raise Damaged("not a feature cache entry of this version")
    start = len(_MAGIC) + 8
    length = int.from_bytes(content[len(_MAGIC):start], "little")
    try:
        header = json.loads(content[start:start + length])
    except ValueError:
        raise Damaged("its header is cut short or altered") from None
    if header.get("key") != key:
        raise Damaged("it holds another key")
    splits, offset = {name: [] for name in SPLITS}, start + length
    for entry in header["arrays"]:
        dtype = np.dtype(entry["dtype"])
        size = int(np.prod(entry["shape"])) * dtype.itemsize
        data = content[offset:offset + size]
        offset += size
        if len(data) < size or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise Damaged("its arrays are cut short or altered")
        splits[entry["split"]].append(np.frombuffer(data, dtype).reshape(entry["shape"]))
    if offset != len(content):
        raise Damaged("it has bytes past its arrays")
    return [splits[name] for name in SPLITS]


class SharedCache:
    """--feature_cache's folder, local or gs://. Entries are published whole, once each: a
    local one written under a temporary name and renamed; a gs:// one uploaded on the
    condition that the object is still what this job last saw (absent, or the damaged one it
    replaces), so of several trials writing at once the first wins and none is harmed."""

    def __init__(self, folder):
        self.folder = folder.rstrip("/")
        self._gcs_errors = None  # google.api_core.exceptions, for a gs:// folder
        self.transient = (OSError,)  # what reading or publishing may raise and survive
        if self.folder.startswith("gs://"):
            from google.api_core import exceptions
            self._gcs_errors = exceptions
            self.transient = (OSError, exceptions.GoogleAPIError)
            self._bucket, self._prefix = buckets.gcs_bucket(self.folder, "--feature_cache")

    def path(self, name):
        return f"{self.folder}/{name}"

    def read(self, name):
        """(bytes or None when absent, the version a replacement is conditional on)."""
        if not self._gcs_errors:
            try:
                with open(self.path(name), "rb") as stream:
                    return stream.read(), None
            except FileNotFoundError:
                return None, None
        blob = self._bucket.get_blob(f"{self._prefix}/{name}".lstrip("/"))
        if blob is None:
            return None, 0
        try:
            return blob.download_as_bytes(if_generation_match=blob.generation), blob.generation
        except self._gcs_errors.NotFound:
            return None, 0
        except self._gcs_errors.PreconditionFailed:  # replaced as it was read: read that one
            return self.read(name)

    def publish(self, name, content, version):
        """Writes the entry unless another job published it first; False then."""
        if not self._gcs_errors:
            os.makedirs(self.folder, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=self.folder)
            with os.fdopen(handle, "wb") as stream:
                stream.write(content)
            os.chmod(temporary, 0o644)  # other jobs' users read it; mkstemp made it 0600
            os.replace(temporary, self.path(name))
            return True
        blob = self._bucket.blob(f"{self._prefix}/{name}".lstrip("/"))
        try:
            blob.upload_from_string(content, if_generation_match=version or 0)
        except self._gcs_errors.PreconditionFailed:
            return False
        return True
