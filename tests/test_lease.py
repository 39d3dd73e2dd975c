"""One job at a time in a --model_dir (local here; gs:// in test_gcs)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from trainer import lease
from trainer.errors import UserError


@pytest.fixture(autouse=True)
def pauses(monkeypatch):
    """Quick heartbeats and polls; returns the pauses a waiting job made, counted rather than
    timed, so that no assertion depends on how fast the machine is."""
    monkeypatch.setattr(lease, "HEARTBEAT_SECONDS", 0.2)
    monkeypatch.setattr(lease, "STALE_SECONDS", 3)
    made = []

    def pause(seconds):
        made.append(seconds)
        assert len(made) < 1000, "still waiting on the lease after 1000 polls"
        time.sleep(0.05)
    monkeypatch.setattr(lease, "_pause", pause)
    return made


def _write(path, **holder):
    content = {"token": "theirs", "host": socket.gethostname(), "pid": os.getpid(),
               "heartbeat": time.time(), "started": "then", **holder}
    path.write_text(json.dumps(content))


def test_a_second_job_is_refused_while_the_first_renews_its_lease(tmp_path, pauses):
    with lease.held(str(tmp_path)):
        with pytest.raises(UserError, match=rf"another job is training in this --model_dir: "
                                            rf"{socket.gethostname()} pid {os.getpid()}, started"):
            with lease.held(str(tmp_path)):
                pass
        assert pauses  # it waited for a renewal, rather than refuse a lease that may be stale
    assert not (tmp_path / ".lease").exists()  # released


def test_the_lease_of_a_killed_job_on_this_host_is_taken_over_at_once(tmp_path, pauses):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    _write(tmp_path / ".lease", pid=int(gone))
    with lease.held(str(tmp_path)):
        holder = json.loads((tmp_path / ".lease").read_text())
        assert holder["pid"] == os.getpid() and holder["token"] != "theirs"
    assert not pauses  # taken over at once: its process is gone from this host


def test_a_lease_not_renewed_is_taken_over_once_stale(tmp_path, pauses):
    _write(tmp_path / ".lease", host="another-host", heartbeat=time.time() - 1)
    with lease.held(str(tmp_path)):
        holder = json.loads((tmp_path / ".lease").read_text())
        assert holder["token"] != "theirs"
    assert pauses  # waited for it to be renewed or go stale
    assert not (tmp_path / ".lease").exists()


def test_a_job_whose_lease_was_taken_over_cannot_renew_it(tmp_path):
    store = lease._LocalStore(str(tmp_path / ".lease"))
    assert store.create({"token": "mine", "heartbeat": time.time()})
    _write(tmp_path / ".lease")  # another job took it over
    assert not store.renew({"token": "mine", "heartbeat": time.time()})
    store.delete()
    assert json.loads((tmp_path / ".lease").read_text())["token"] == "theirs"


def test_workers_other_than_the_chief_take_no_lease(tmp_path):
    with lease.held(str(tmp_path), chief=False):
        assert not (tmp_path / ".lease").exists()


def test_a_gcs_lease_without_credentials_is_one_line(monkeypatch, tmp_path):
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no application-default login there
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")  # nothing answers: not on GCE
    with pytest.raises(UserError, match="no Google Cloud credentials for the lease "
                                        "gs://b/run/.lease .*gcloud auth application-default"):
        with lease.held("gs://b/run"):
            pass


def test_the_start_time_a_holder_shows_stays_that_of_its_start(tmp_path):
    with lease.held(str(tmp_path)):
        first = json.loads((tmp_path / ".lease").read_text())
        renewals, give_up = set(), time.monotonic() + 120  # a bound, not a race: renewals
        while len(renewals) < 3:  # come every 0.2 s; several, each with a new heartbeat
            assert time.monotonic() < give_up, "the lease was not renewed"
            holder = json.loads((tmp_path / ".lease").read_text())
            renewals.add(holder["heartbeat"])
            assert holder["started"] == first["started"]
            time.sleep(0.05)


def test_a_job_whose_lease_is_taken_over_stops(tmp_path):
    """Its next renewal finds another job's lease: it stops as a preempted job does."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from trainer import lease\n"
         "lease.HEARTBEAT_SECONDS = 0.2\n"
         "with lease.held(sys.argv[1]):\n    print('holding', flush=True); sys.stdin.read()",
         str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline() == "holding\n", holder.stderr.read()
        _write(tmp_path / ".lease", pid=12345)  # another job takes it over
        assert holder.wait(timeout=120) == -15  # SIGTERM: a job checkpoints, then exits 42
    finally:
        holder.kill()
    assert "another job took over the lease" in holder.stderr.read()


def test_a_renewal_that_fails_is_tried_again_at_the_next_heartbeat(tmp_path, monkeypatch,
                                                                     caplog):
    """Storage failing for a heartbeat (OSError locally; any GoogleAPIError on gs://) costs a
    warning, not the lease: the next heartbeat renews it."""
    renew = lease._LocalStore.renew
    calls = []
    renewed = threading.Event()

    def flaky(store, content):
        calls.append(content["heartbeat"])
        if len(calls) == 1:
            raise OSError("storage is down")
        result = renew(store, content)
        renewed.set()
        return result
    monkeypatch.setattr(lease._LocalStore, "renew", flaky)
    with lease.held(str(tmp_path)):
        assert renewed.wait(60), "the lease was not renewed after the failure"
        holder = json.loads((tmp_path / ".lease").read_text())
        assert holder["pid"] == os.getpid() and holder["heartbeat"] in calls[1:]
    assert "could not renew the lease" in caplog.text and "storage is down" in caplog.text
