"""One job at a time in a --model_dir: a lease file, `<model_dir>/.lease`, that the job holding
it renews every HEARTBEAT_SECONDS.

A second job finds a live lease and refuses, naming the holder, once it sees it renewed. A
lease not renewed for STALE_SECONDS, or one whose process on this host is gone, belongs to a
job that was killed: its rerun takes it over. Taking over and renewing are atomic: on gs://
every write is conditional on the generation read before it (google-cloud-storage
preconditions); locally the file is created with O_EXCL and a stale one renamed away first. A job that finds its lease
taken over stops as if preempted, so two jobs never go on writing the same run.
"""

import contextlib
import json
import os
import signal
import socket
import threading
import time
import uuid

from absl import logging

from trainer.errors import UserError, first_line

HEARTBEAT_SECONDS = 10
STALE_SECONDS = 45
# How often a job waiting on a live lease reads it again.
POLL_SECONDS = 1
NAME = ".lease"


@contextlib.contextmanager
def held(model_dir, chief=True):
    """Holds the lease of model_dir while the block runs (the chief only: under multi-worker
    the other workers write nothing there)."""
    if not chief:
        yield
        return
    store = _GcsStore if model_dir.startswith("gs://") else _LocalStore
    lease = _Lease(store(os.path.join(model_dir, NAME)))
    lease.acquire()
    try:
        yield
    finally:
        lease.release()


def _describe(holder):
    where = f"{holder.get('host')} pid {holder.get('pid')}"
    job = holder.get("vertex_job")
    return (f"job {job} ({where})" if job else where) + (
        f", started {holder.get('started')}, renewed {time.time() - holder['heartbeat']:.0f}s ago")


class _Lease:
    def __init__(self, store):
        self.store = store
        self.token = uuid.uuid4().hex
        self.started = time.strftime("%Y-%m-%d %H:%M:%S %Z")  # kept through renewals
        self.stop = threading.Event()
        self.thread = None

    def _content(self):
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "vertex_job": os.environ.get("CLOUD_ML_JOB_ID"), "heartbeat": time.time(),
                "started": self.started}

    def acquire(self):
        content = self._content()
        if not self.store.create(content):
            holder, version = self._wait_while_live()
            if holder is not None:
                logging.warning("taking over the lease of a job that stopped: %s",
                                _describe(holder))
            if not self.store.replace(content, version):
                raise UserError(f"another job took the lease of this --model_dir just now "
                                f"({self.store.path}); wait for it or use another --model_dir")
        self.thread = threading.Thread(target=self._renew, daemon=True, name="lease")
        self.thread.start()

    def _wait_while_live(self):
        """The lease as last read, once it is stale or gone; refuses as soon as it is renewed.
        A job killed moments ago left a lease that looks live until it goes stale."""
        holder, version = self.store.read()
        first = version
        if holder is not None and not _stale(holder):
            logging.warning("%s holds a lease on this --model_dir; waiting up to %ds to see it "
                            "renewed (a job at work) or expire (a job that was killed)",
                            _describe(holder), STALE_SECONDS)
        while holder is not None and not _stale(holder):
            _pause(POLL_SECONDS)
            holder, version = self.store.read()
            if holder is not None and version != first:
                raise UserError(f"another job is training in this --model_dir: "
                                f"{_describe(holder)}; wait for it, stop it, or use another "
                                f"--model_dir (its lease: {self.store.path})")
        return holder, version

    def _renew(self):
        while not self.stop.wait(HEARTBEAT_SECONDS):
            try:
                renewed = self.store.renew(self._content())
            except self.store.transient as error:  # a blip: the next heartbeat tries again
                logging.warning("could not renew the lease %s: %s", self.store.path,
                                first_line(error))
                continue
            if not renewed:
                logging.error("another job took over the lease %s: stopping here",
                              self.store.path)
                os.kill(os.getpid(), signal.SIGTERM)  # checkpoint and stop, as if preempted
                return

    def release(self):
        self.stop.set()
        if self.thread:
            self.thread.join()
        self.store.delete()


def _pause(seconds):
    time.sleep(seconds)


def _stale(holder):
    if time.time() - holder.get("heartbeat", 0) > STALE_SECONDS:
        return True
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


class _LocalStore:
    transient = (OSError,)

    def __init__(self, path):
        self.path = path
        self.mine = None  # the content last written by this job

    def create(self, content):
        try:
            handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(handle, "w") as stream:
            json.dump(content, stream)
        self.mine = content
        return True

    def read(self):
        try:
            with open(self.path) as stream:
                text = stream.read()
        except FileNotFoundError:
            return None, None
        try:
            return json.loads(text), text
        except ValueError:  # cut short by a kill mid-write: stale
            return {"heartbeat": 0}, text

    def replace(self, content, version):
        """Moves the stale lease read as `version` away, then creates ours."""
        aside = f"{self.path}.stale-{content['token']}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return self.create(content)
        with open(aside) as stream:
            moved = stream.read()
        if moved != version:  # another job renewed or replaced it meanwhile: put it back
            os.rename(aside, self.path)
            return False
        os.remove(aside)
        return self.create(content)

    def renew(self, content):
        holder, _ = self.read()
        if not holder or holder.get("token") != content["token"]:
            return False
        temporary = f"{self.path}.{content['token']}"
        with open(temporary, "w") as stream:
            json.dump(content, stream)
        os.replace(temporary, self.path)
        return True

    def delete(self):
        holder, _ = self.read()
        if holder and self.mine and holder.get("token") == self.mine["token"]:
            os.remove(self.path)


class _GcsStore:
    def __init__(self, path):
        from google.api_core import exceptions
        from trainer import buckets
        self.path = path
        self.transient = (OSError, exceptions.GoogleAPIError)
        self.conflict = (exceptions.PreconditionFailed, exceptions.Conflict)
        self.missing = exceptions.NotFound
        self.bucket, self.name = buckets.gcs_bucket(path, "the lease")
        self.generation = None  # of the object this job wrote last

    def _write(self, content, generation):
        blob = self.bucket.blob(self.name)
        try:
            blob.upload_from_string(json.dumps(content), if_generation_match=generation)
        except self.conflict:
            return False
        self.generation = blob.generation
        return True

    def create(self, content):
        return self._write(content, 0)

    def read(self):
        """(content, generation): the generation a takeover is made conditional on."""
        blob = self.bucket.blob(self.name)  # a new one: no generation kept from before
        try:
            text = blob.download_as_bytes()
        except self.missing:
            return None, 0
        try:
            return json.loads(text), blob.generation
        except ValueError:
            return {"heartbeat": 0}, blob.generation

    def replace(self, content, version):
        return self._write(content, version)

    def renew(self, content):
        return self._write(content, self.generation)

    def delete(self):
        try:
            self.bucket.blob(self.name).delete(if_generation_match=self.generation)
        except (self.missing, *self.conflict):
            pass
