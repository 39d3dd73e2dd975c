"""Where what the job computes once is kept: the storage, not the policy.

Store holds the arrays of cached inputs or decoded images, in memory while --memory_budget_mb
lasts and in files in the local temp dir beyond it. A --feature_cache entry is those arrays
under a key (the backbone, its weights, preprocessing, precision, the data), kept as chunks
of rows: each encoded, checked when decoded, and published to a SharedCache folder so that
the first of several writers wins. What each phase trains on, and when the pass runs, is phase_data.py's.
It may not build models or pipelines, nor decide what a phase reads.
"""

import fcntl
import hashlib
import json
import os
import tempfile
import time
import uuid

import numpy as np

from trainer import buckets
from trainer import model
from trainer import pipelines
from trainer import sources


class Store:
    """Arrays of cached inputs or decoded images, one row an example: in memory while the
    budget lasts, else memory-mapped files in the local temp dir. A file is unlinked as soon as
    it is mapped: the mapping keeps it while the job needs it, and however the job ends, even
    by SIGKILL, the system frees it, so no preemption leaves gigabytes behind."""

    def __init__(self, budget_bytes):
        self.memory_left = budget_bytes

    def allocate(self, shape, dtype):
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if size <= self.memory_left:
            self.memory_left -= size
            return np.zeros(shape, dtype)
        handle, path = tempfile.mkstemp(prefix="trainer-features-", suffix=".bin")
        try:
            os.ftruncate(handle, max(size, 1))
            return np.memmap(path, dtype=dtype, mode="r+", shape=tuple(shape))
        finally:
            os.unlink(path)
            os.close(handle)

    def copy(self, array, dtype):
        copy = self.allocate(array.shape, dtype)
        copy[:] = array
        return copy


def compact(array, rows):
    """array[rows] in place, for increasing rows (the examples kept): the first len(rows) rows
    of the same array or memmap, moved a block at a time, so that no copy of the whole is
    made. A row is only ever moved towards the front, onto rows already moved."""
    for start in range(0, len(rows), 4096):
        block = rows[start:start + 4096]
        array[start:start + len(block)] = array[block]
    return array[:len(rows)]


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

FORMAT = "trainer-feature-cache-v3"
_MAGIC = FORMAT.encode() + b"\n"
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
            "data": {name: sources.fingerprint(getattr(source, name)) for name in sources.SPLITS}}


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


def chunk_name(key, split, start, end):
    """The file of rows [start, end) of an entry's split: the backbone and image size for
    people, a hash of the entry's key, the rows."""
    text = json.dumps(key, sort_keys=True)
    kind = "features" if key["outputs"] == _POOLED else "activations"
    return (f"{key['backbone']}-{key['image_size']}px-{kind}-"
            f"{hashlib.sha256(text.encode()).hexdigest()[:32]}-{split}-{start:09d}-{end:09d}.bin")


def encode(key, arrays, meta=None):
    """A chunk's bytes: the format line, the header's length and SHA-256, the header (the key,
    `meta`, and each array's dtype, shape and hash), then the arrays."""
    arrays = [np.ascontiguousarray(array) for array in arrays]
    header = {"key": key, "meta": meta or {}, "arrays": [
        {"dtype": array.dtype.name, "shape": list(array.shape),
         "sha256": hashlib.sha256(array.data).hexdigest()} for array in arrays]}
    text = json.dumps(header).encode()
    return b"".join([_MAGIC, len(text).to_bytes(8, "little"), hashlib.sha256(text).digest(),
                     text, *(array.tobytes() for array in arrays)])


def decode(content, key):
    """(arrays, meta) of a chunk's bytes; raises Damaged when they are not exactly what
    encode(key, ...) wrote: every byte is covered by the format line, the header's hash or an
    array's hash, so no damage can pass for a chunk."""
    if not content.startswith(_MAGIC):
        raise Damaged("not a feature cache entry of this version")
    content = memoryview(content)  # slices of it are views: a chunk's arrays are not copied
    start = len(_MAGIC) + 8 + 32
    length = int.from_bytes(content[len(_MAGIC):start - 32], "little")
    text = content[start:start + length].tobytes()
    if hashlib.sha256(text).digest() != content[start - 32:start].tobytes():
        raise Damaged("its header is cut short or altered")
    header = json.loads(text)
    if header.get("key") != key:
        raise Damaged("it holds another key")
    arrays, offset = [], start + length
    for entry in header["arrays"]:
        dtype = np.dtype(entry["dtype"])
        size = int(np.prod(entry["shape"])) * dtype.itemsize
        data = content[offset:offset + size]
        offset += size
        if len(data) < size or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise Damaged("its arrays are cut short or altered")
        arrays.append(np.frombuffer(data, dtype).reshape(entry["shape"]))
    if offset != len(content):
        raise Damaged("it has bytes past its arrays")
    return arrays, header["meta"]


# A publisher's temporary file is taken for abandoned once it is unchanged this long and its
# lock is free (a live publisher takes the lock right after creating it), or, where the file
# system has no locks, after ABANDONED_SECONDS.
UNLOCKED_SECONDS = 60
ABANDONED_SECONDS = 3600


class SharedCache:
    """--feature_cache's folder, local or gs://. Entries are published whole, once each: a
    local one written under a temporary name and renamed; a gs:// one uploaded on the
    condition that the object is still what this job last saw (absent, or the damaged one it
    replaces), so of several trials writing at once the first wins and none is harmed."""

    def __init__(self, folder, described=None):
        self.folder = folder.rstrip("/")
        self.described = described or self.folder  # how the job's lines name it
        self._gcs_errors = None  # google.api_core.exceptions, for a gs:// folder
        self.transient = (OSError,)  # what reading or publishing may raise and survive
        if self.folder.startswith("gs://"):
            from google.api_core import exceptions
            self._gcs_errors = exceptions
            self.transient = (OSError, exceptions.GoogleAPIError)
            self._bucket, self._prefix = buckets.gcs_bucket(self.folder, "--feature_cache")

    def path(self, name):
        return f"{self.folder}/{name}"

    def _remove_dead_publishers(self):
        """Removes the temporary files that publishers killed mid-write left in a local
        folder: those unchanged for a minute whose lock can be taken (the writer is gone; a
        live one locks its file as soon as it has made it), and, where the file system has no
        locks, those unchanged for an hour."""
        for name in os.listdir(self.folder):
            if not (name.startswith(".") and name.endswith(".tmp")):
                continue
            path = self.path(name)
            try:
                with open(path, "rb") as stream:
                    age = time.time() - os.fstat(stream.fileno()).st_mtime
                    if age < UNLOCKED_SECONDS:
                        continue
                    try:
                        fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # being written
                    except OSError:
                        if age < ABANDONED_SECONDS:
                            continue
                    os.remove(path)
            except OSError:
                continue  # renamed or removed meanwhile

    def names(self):
        """The names of the entries in the folder, from one listing (no entry is read)."""
        if not self._gcs_errors:
            try:
                return set(os.listdir(self.folder))
            except FileNotFoundError:
                return set()
        prefix = f"{self._prefix}/".lstrip("/")
        return {blob.name[len(prefix):]
                for blob in self._bucket.list_blobs(prefix=prefix, delimiter="/")}

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
            self._remove_dead_publishers()
            temporary = self.path(f".{name}.{uuid.uuid4().hex}.tmp")
            with open(temporary, "wb") as stream:
                # Held until the process ends, however it ends: a later job that can take
                # the lock knows the writer is dead.
                fcntl.flock(stream, fcntl.LOCK_EX)
                stream.write(content)
                os.chmod(temporary, 0o644)  # for other jobs' users
                os.replace(temporary, self.path(name))
            return True
        blob = self._bucket.blob(f"{self._prefix}/{name}".lstrip("/"))
        try:
            blob.upload_from_string(content, if_generation_match=version or 0)
        except self._gcs_errors.PreconditionFailed:
            return False
        return True
