"""Paths that may be local or gs://, all through tf.io.gfile so that one code path serves both."""

import json
import os
import tempfile
import time

from absl import logging
import tensorflow as tf

from trainer.errors import UserError, op_reason

# What storage raises while it is unreachable or overloaded, after TensorFlow's own few quick
# retries (a read or a listing that returns NotFound then is not one of these): the same call
# may succeed later.
TRANSIENT = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError)


class Backoff:
    """Waits between attempts at something storage keeps failing, doubling the wait, until
    failures have lasted `budget` seconds; then raises UserError. A failure more than `budget`
    after the last one starts a new outage."""

    def __init__(self, budget):
        self.budget = budget
        self.began = self.last = None
        self.delay = 1.0

    def wait(self, error, what):
        now = time.monotonic()
        if self.last is None or now - self.last > self.budget:
            self.began, self.delay = now, 1.0
        self.last = now
        if now - self.began + self.delay > self.budget:
            raise UserError(f"storage failed for {now - self.began:.0f}s while {what} "
                            f"({op_reason(error)}); what was written is kept: check the network "
                            "or bucket, then run the same command to resume") from None
        logging.warning("storage failed while %s (%s); trying again in %.0fs", what,
                        op_reason(error), self.delay)
        time.sleep(self.delay)
        self.delay = min(2 * self.delay, 30.0)


def retrying(function, budget, what):
    """function(), tried again while storage fails transiently, for up to budget seconds."""
    backoff = Backoff(budget)
    while True:
        try:
            return function()
        except TRANSIENT as error:
            backoff.wait(error, what)


def check_reachable(path):
    """A one-line error naming the bucket when storage cannot be reached at all: a listing
    during an outage reads as 'not found' and would blame the data."""
    bucket = bucket_root(path)
    if not bucket:
        return
    try:
        found = tf.io.gfile.exists(bucket)
    except tf.errors.OpError as error:
        raise UserError(f"cannot reach {bucket} (storage.googleapis.com): {op_reason(error)}; "
                        "check the network and your access, then run again") from None
    if not found:
        raise UserError(f"bucket {bucket} of {path} does not exist or is not accessible: "
                        "create it (gcloud storage buckets create) or fix the path")


def join(*parts):
    return os.path.join(*parts)


def is_remote(path):
    return "://" in path


def bucket_root(path):
    """gs://bucket/ of a gs:// path, or None for a local path."""
    if not path.startswith("gs://"):
        return None
    return "gs://" + path[len("gs://"):].split("/", 1)[0] + "/"


def exists(path):
    return tf.io.gfile.exists(path)


def read_text(path):
    with tf.io.gfile.GFile(path, "r") as handle:
        return handle.read()


def read_bytes(path):
    with tf.io.gfile.GFile(path, "rb") as handle:
        return handle.read()


def write_bytes(path, content):
    """Writes a temporary file and renames it, so a killed job never leaves half a file."""
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    temporary = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(temporary, "wb") as handle:
        handle.write(content)
    tf.io.gfile.rename(temporary, path, overwrite=True)


def write_text(path, text):
    write_bytes(path, text.encode())


def write_lines(path, lines):
    write_text(path, "".join(f"{line}\n" for line in lines))


def write_json(path, value):
    write_text(path, json.dumps(value, indent=2) + "\n")


def read_json(path):
    return json.loads(read_text(path))


def listdir(path):
    """Entry names without the trailing '/' that gs:// listings give folders."""
    return sorted(name.rstrip("/") for name in tf.io.gfile.listdir(path))


def stamps(folder, report=None):
    """{file name: stamp} of the files in a folder, from one listing and without reading them:
    a stamp says "this exact content" as far as storage tells without a read (a local file's
    size and modification time in ns; a gs:// object's size and generation, which every
    write changes). An entry that cannot be stat'ed (a dangling link) gets "unreadable".
    report (a progress.Report) counts the entries as they come."""
    found = {}
    if folder.startswith("gs://"):
        from trainer import buckets
        bucket, prefix = buckets.gcs_bucket(folder, "--data")
        prefix = prefix.rstrip("/") + "/"
        for blob in bucket.list_blobs(prefix=prefix, delimiter="/"):
            if blob.name != prefix:
                found[blob.name[len(prefix):]] = f"{blob.size}:{blob.generation}"
                if report:
                    report.add()
        return found
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                status = entry.stat()
                found[entry.name] = f"{status.st_size}:{status.st_mtime_ns}"
            except OSError:
                found[entry.name] = "unreadable"
            if report:
                report.add()
    return found


def isdir(path):
    return tf.io.gfile.isdir(path)


def remove_tree(path):
    if tf.io.gfile.exists(path):
        if tf.io.gfile.isdir(path):
            tf.io.gfile.rmtree(path)
        else:
            tf.io.gfile.remove(path)


def local_copy(path):
    """A local path with the file's content: the path itself, or a copy of a remote file."""
    if not is_remote(path):
        return path
    directory = tempfile.mkdtemp(prefix="trainer-")
    local = os.path.join(directory, os.path.basename(path))
    tf.io.gfile.copy(path, local, overwrite=True)
    return local
