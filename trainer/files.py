"""Paths that may be local or gs://, all through tf.io.gfile so that one code path serves both."""

import json
import os
import tempfile

import tensorflow as tf


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
