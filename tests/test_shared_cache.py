"""--feature_cache: what the backbone pass gives, kept for later jobs with the same key."""

import concurrent.futures
import logging
import os
import re
import threading
import time

import numpy as np
import pytest

from tests import images
from tests.test_train import tiny_data, tiny_trainer
from trainer import cache
from trainer.errors import UserError

KEY = {"backbone": "small_cnn", "image_size": 16, "outputs": "pooled backbone features"}


META = {"3": "cannot be decoded"}


def _arrays():
    rng = np.random.default_rng(0)
    return [rng.normal(size=(8, 4)).astype(np.float32),
            rng.normal(size=(8, 2, 2, 3)).astype(np.float16)]


def test_a_chunk_reads_back_exactly_what_was_written():
    arrays = _arrays()
    decoded, meta = cache.decode(cache.encode(KEY, arrays, META), KEY)
    assert meta == META
    for written, read in zip(arrays, decoded):
        assert read.dtype == written.dtype
        np.testing.assert_array_equal(read, written)


@pytest.mark.parametrize("damage, reason", [
    (lambda content: content[:len(content) // 2], "cut short or altered"),
    (lambda content: content[:-1] + bytes([content[-1] ^ 1]), "cut short or altered"),
    (lambda content: content + b"\0", "bytes past its arrays"),
    (lambda content: content[:40], "header is cut short"),
    (lambda content: b"", "not a feature cache entry"),
])
def test_a_damaged_entry_is_never_trusted(damage, reason):
    content = damage(cache.encode(KEY, _arrays(), META))
    with pytest.raises(cache.Damaged, match=reason):
        cache.decode(content, KEY)


def test_no_flipped_bit_anywhere_in_an_entry_passes_for_it():
    """Every bit of a small entry flipped in turn: the format line, the header's length and
    hash, the header with each array's dtype, shape and hash, and the arrays themselves."""
    content = cache.encode(KEY, _arrays(), META)
    escaped = []
    for bit in range(len(content) * 8):
        damaged = bytearray(content)
        damaged[bit // 8] ^= 1 << bit % 8
        try:
            cache.decode(bytes(damaged), KEY)
        except cache.Damaged:
            continue
        escaped.append(bit)
    assert not escaped, f"{len(escaped)} of {len(content) * 8} flipped bits were trusted"


def test_an_entry_of_another_key_is_never_used():
    content = cache.encode(KEY, _arrays(), META)
    with pytest.raises(cache.Damaged, match="another key"):
        cache.decode(content, {**KEY, "image_size": 32})


def _run(tmp_path, name, data, capsys, other_weights=False, **settings):
    """(stdout, history, entry files) of a tiny run sharing tmp_path/'shared'."""
    shared = str(tmp_path / "shared")
    # As another weights file would give.
    adjust = (lambda classifier: classifier.backbone.weights[0].assign_add(0.01)) \
        if other_weights else None
    with tiny_trainer(tmp_path / name, data=data, adjust=adjust, feature_cache=shared,
                      **settings) as trainer:
        trainer.fit(trainer.schedule.head)
        trainer.fit(trainer.schedule.fine_tune)
        history = trainer.history
    return capsys.readouterr().out, history, sorted(os.listdir(shared))


def _losses(history):
    return [(row["loss"], row["val_loss"], row["val_accuracy"]) for row in history]


def test_a_later_job_with_the_same_key_skips_the_backbone_pass(tmp_path, capsys):
    data = tiny_data(tmp_path / "data")
    first, history, entries = _run(tmp_path, "first", data, capsys)
    assert "cached backbone features and activations entering layer 7" in first
    # A chunk of rows each: 8 train and 2 validation images are one chunk a split.
    assert [name.split("-")[2:] [:1] + name.split("-")[4:5] for name in entries] == [
        ["activations", "train"], ["activations", "validation"], ["features", "train"],
        ["features", "validation"]]
    second, again, _ = _run(tmp_path, "second", data, capsys)
    assert "cached backbone" not in second and "cached activations" not in second
    shared = f"--feature_cache {tmp_path / 'shared'}"
    # Phase 2's activations are read when it starts, after phase 1's epochs.
    assert re.search(
        f"read backbone features of 8 train and 2 validation images from {shared} in .*\n"
        f"activations entering layer 7 of small_cnn at 16 px found in {shared}: read when "
        "phase fine_tune starts\n(.*\n)*epoch 1/2 .*\nread activations entering layer 7 of 8 "
        f"train and 2 validation images from {shared} in .*\nepoch 2/2 ", second), second
    assert _losses(again) == _losses(history)


def test_what_determines_an_entry_is_in_its_key(tmp_path, capsys):
    data = tiny_data(tmp_path / "data")
    _, _, entries = _run(tmp_path, "first", data, capsys)
    # Another cut below --fine_tune_at: the features are those already kept.
    out, _, more = _run(tmp_path, "cut", data, capsys, fine_tune_at=4)
    assert "read backbone features of" in out and "cached activations entering layer" in out
    assert len(more) == 6
    # Other backbone weights: nothing is reused.
    out, _, more = _run(tmp_path, "weights", data, capsys, other_weights=True)
    assert "read " not in out and len(more) == 10
    # One image's content changed, under the same name and size: nothing is reused.
    images.save(sorted(_image_files(data))[0], colour=(1, 2, 3), size=16, seed=99)
    out, _, more = _run(tmp_path, "changed", data, capsys)
    assert "read " not in out and len(more) == 14


def _image_files(folder):
    return [os.path.join(root, name) for root, _, names in os.walk(folder)
            for name in names if name.endswith(".jpg")]


# Phase 1's features are read before training, phase 2's activations when phase 2 starts.
@pytest.mark.parametrize("entry, what, after", [
    (2, "backbone features", "read activations entering layer 7 of .*"),
    (0, "activations entering layer 7", "epoch 1/2 .*")])
def test_a_damaged_entry_is_computed_again_with_a_warning(tmp_path, capsys, caplog, entry,
                                                          what, after):
    data = tiny_data(tmp_path / "data")
    _, history, entries = _run(tmp_path, "first", data, capsys)
    path = tmp_path / "shared" / entries[entry]  # of the train images
    path.write_bytes(path.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING):
        out, again, _ = _run(tmp_path, "second", data, capsys)
    assert f"feature cache entry {path} is damaged" in caplog.text
    # The chunk computed, the other one of its phase (validation) read.
    assert re.search(f"{after}\ncached {what} of 8 train and 2 validation images in .*, "
                     "1 chunk\\(s\\) of it read from ", out), out
    assert _losses(again) == _losses(history)
    out, _, _ = _run(tmp_path, "third", data, capsys)  # published whole again
    assert "read backbone features of" in out and "read activations entering" in out
    assert "cached backbone" not in out and "cached activations" not in out


def test_an_image_that_no_longer_reads_when_phase_2_computes_a_chunk_is_an_error(tmp_path,
                                                                                 capsys):
    data = tiny_data(tmp_path / "data")
    _, _, entries = _run(tmp_path, "first", data, capsys)
    path = tmp_path / "shared" / entries[0]  # the activations of the train images
    path.write_bytes(path.read_bytes()[:-100])
    image = sorted(_image_files(data))[0]  # a train image
    status = os.stat(image)
    with open(image, "r+b") as handle:  # same size and time: the same key
        handle.write(b"\0" * 64)
    os.utime(image, ns=(status.st_atime_ns, status.st_mtime_ns))
    # Read fine by the pass (phase 1's chunks hold it), so the run's examples would change.
    with pytest.raises(UserError, match=r"\.jpg .* for phase fine_tune, though it read when "
                                        r"the job started: check it and run the same command "
                                        r"again \(training is kept\)"):
        _run(tmp_path, "second", data, capsys)


def test_storage_failing_under_the_cache_costs_the_chunk_not_the_job(tmp_path, capsys, caplog,
                                                                    monkeypatch):
    """A write that fails (OSError; on gs://, any GoogleAPIError too) leaves the entry
    unpublished; a read that fails means computing the chunk. Either way a warning, and the
    job trains as it would have."""
    data = tiny_data(tmp_path / "data")
    _, history, _ = _run(tmp_path, "plain", data, capsys)

    def failing(shared, name, *args):
        raise OSError(f"storage is down under {name}")
    monkeypatch.setattr(cache.SharedCache, "publish", failing)
    (tmp_path / "write" / "shared").mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        _, unpublished, entries = _run(tmp_path / "write", "run", data, capsys)
    assert "could not write the feature cache entry" in caplog.text and entries == []
    assert _losses(unpublished) == _losses(history)
    monkeypatch.undo()
    _run(tmp_path / "read", "first", data, capsys)  # publishes
    caplog.clear()
    monkeypatch.setattr(cache.SharedCache, "read", failing)
    with caplog.at_level(logging.WARNING):
        out, unread, _ = _run(tmp_path / "read", "second", data, capsys)
    assert "could not read the feature cache entry" in caplog.text
    assert "cached backbone features and activations" in out
    assert _losses(unread) == _losses(history)


def test_concurrent_publishers_never_show_a_reader_half_an_entry(tmp_path):
    shared = cache.SharedCache(str(tmp_path / "shared"))
    rng = np.random.default_rng(0)
    big = [rng.normal(size=(2000, 1000)).astype(np.float32)]
    content = cache.encode(KEY, big)  # 8 MB: a write takes many system calls
    done = threading.Event()
    seen, damaged, while_publishing = [], [], []

    def read_while_written():
        while True:
            finished = done.is_set()  # then this is the last read, after every publish
            found, _ = shared.read("entry.bin")
            while_publishing.append(not finished)
            if found is not None:
                seen.append(len(found))
                try:
                    cache.decode(found, KEY)
                except cache.Damaged as error:  # half an entry
                    damaged.append(error)
            if finished:
                return

    reader = threading.Thread(target=read_while_written)
    reader.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            published = list(pool.map(lambda _: shared.publish("entry.bin", content, None),
                                      range(8)))
    finally:
        done.set()
        reader.join()
    assert any(while_publishing)  # reads went on while entries were being written
    assert all(published) and seen and set(seen) == {len(content)} and not damaged
    cache.decode(shared.read("entry.bin")[0], KEY)
    assert os.listdir(tmp_path / "shared") == ["entry.bin"]  # no temporary left behind


def test_what_a_killed_publisher_left_is_removed_by_a_later_job(tmp_path):
    import signal
    import subprocess
    import sys
    shared = cache.SharedCache(str(tmp_path / "shared"))
    shared.publish("first.bin", b"x", None)
    dead = tmp_path / "shared" / ".second.bin.0123abcd.tmp"  # its writer died mid-write
    dead.write_bytes(b"half an entry")
    os.utime(dead, (time.time() - 120, time.time() - 120))  # a while ago
    young = tmp_path / "shared" / ".sixth.bin.89abcdef.tmp"  # just created, not locked yet
    young.write_bytes(b"")
    live = tmp_path / "shared" / ".third.bin.4567cdef.tmp"
    writer = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; stream = open(sys.argv[1], 'wb'); "
         "fcntl.flock(stream, fcntl.LOCK_EX); print('writing', flush=True); sys.stdin.read()",
         str(live)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n"
        shared.publish("fourth.bin", b"y", None)
        assert sorted(os.listdir(tmp_path / "shared")) == [
            ".sixth.bin.89abcdef.tmp", ".third.bin.4567cdef.tmp", "first.bin", "fourth.bin"]
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    for left in (live, young):
        os.utime(left, (time.time() - 120, time.time() - 120))
    shared.publish("fifth.bin", b"z", None)
    assert sorted(os.listdir(tmp_path / "shared")) == ["fifth.bin", "first.bin", "fourth.bin"]


def test_the_key_follows_image_size_precision_and_the_tfds_split(tmp_path):
    import dataclasses
    import types
    from trainer import config as config_lib
    from trainer import sources
    source = sources.scan(tiny_data(tmp_path / "data"))
    config = config_lib.Config(data="x", backbone="small_cnn", image_size=16)
    key = cache.common_key(config, "float32", source)
    assert cache.common_key(config, "float32", source) == key
    assert cache.common_key(dataclasses.replace(config, image_size=32), "float32", source) != key
    assert cache.common_key(config, "mixed_bfloat16", source) != key
    builder = types.SimpleNamespace(info=types.SimpleNamespace(as_json='{"name": "d"}'))
    split = dataclasses.replace(source.train, tfds=(builder, "train[:80%]"))
    other = dataclasses.replace(source.train, tfds=(builder, "train[80%:]"))
    assert sources.fingerprint(split) != sources.fingerprint(other)
    assert cache.common_key(config, "float32", dataclasses.replace(source, train=split)) != \
        cache.common_key(config, "float32", dataclasses.replace(source, train=other))
