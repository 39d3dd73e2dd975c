"""Everything gs:// against a real GCS emulator, through TensorFlow's own GCS filesystem."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests import images
from tests.conftest import REPO, TINY_MODEL, cli_env, error_line, run_module

pytestmark = pytest.mark.slow  # every test here runs the CLI in a subprocess

JOB = [*TINY_MODEL, "--image_size=32", "--epochs=3",
       "--fine_tune_epochs=1", "--learning_rate=1e-2", "--batch_size=8"]


def run(gcs, module, *args, **kwargs):
    return run_module(module, *args, env=cli_env(**gcs.env), **kwargs)


def read_json(gcs, url):
    bucket, _, name = url[len("gs://"):].partition("/")
    return json.loads(gcs.client().bucket(bucket).blob(name).download_as_bytes())


@pytest.fixture(scope="module")
def bucket_run(gcs, tmp_path_factory):
    """An image folder on gs://, trained with --model_dir on gs://."""
    bucket = gcs.bucket("photos")
    local = images.folder(str(tmp_path_factory.mktemp("photos")), per_class=12,
                          validation_per_class=4, size=32)
    images.save_corrupt(os.path.join(local, "train", "red", "zero.jpg"), "empty")
    data = gcs.upload_tree(local, f"{bucket}/colours")
    model_dir = f"{bucket}/runs/one"
    process = run(gcs, "trainer.task", f"--data={data}", f"--model_dir={model_dir}", *JOB)
    assert process.returncode == 0, process.stderr[-3000:]
    return data, model_dir, process, local


def test_image_folder_and_model_dir_on_gcs(gcs, bucket_run):
    data, model_dir, _, _ = bucket_run
    written = gcs.list(model_dir)
    for name in ("config.yaml", "labels.txt", "metrics.json", "report.png",
                 "export/saved_model.pb"):
        assert f"runs/one/{name}" in written, written
    assert any(name.startswith("runs/one/checkpoints/ckpt-") for name in written)
    assert any(name.startswith("runs/one/logs/train/events") for name in written)
    metrics = read_json(gcs, f"{model_dir}/metrics.json")
    assert metrics["skipped_images"] == 1 and metrics["train_images"] == 24
    assert metrics["skipped_examples"] == [f"{data}/train/red/zero.jpg"]


def test_predict_from_gcs_export_on_gcs_images(gcs, bucket_run):
    data, model_dir, _, local = bucket_run

    def predicted(root):
        process = run(gcs, "trainer.predict", f"--model_dir={model_dir}", "--json",
                      f"{root}/validation/red", f"{root}/validation/green/green_0.jpg")
        assert process.returncode == 0, process.stderr[-3000:]
        return [json.loads(line) for line in process.stdout.splitlines()]
    remote = predicted(data)
    assert [r["path"] for r in remote] == [f"{data}/validation/red/red_{i}.jpg"
                                           for i in range(4)] + [
        f"{data}/validation/green/green_0.jpg"]
    # Each image read from gs:// is classified exactly as its local copy is.
    assert [r["top"] for r in remote] == [r["top"] for r in predicted(local)]


def test_finished_gcs_run_is_complete(gcs, bucket_run):
    data, model_dir, _, _ = bucket_run
    process = run(gcs, "trainer.task", f"--data={data}", f"--model_dir={model_dir}", *JOB)
    assert process.returncode == 0 and "already complete" in process.stdout


def test_killed_run_resumes_from_gcs(gcs, tmp_path):
    bucket = gcs.bucket("resume")
    data = gcs.upload_tree(images.folder(str(tmp_path / "data"), per_class=16, size=32),
                           f"{bucket}/data")
    model_dir = f"{bucket}/run"
    # 13 epochs of 4 steps: killed after step 6, far from its end however fast it runs.
    args = [f"--data={data}", f"--model_dir={model_dir}", *JOB, "--epochs=12",
            "--checkpoint_every_steps=3"]
    job = subprocess.Popen([sys.executable, "-m", "trainer.task", *args], cwd=REPO,
                           env=cli_env(**gcs.env), stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 180
    while not any(re.search(r"ckpt-(\d+)\.index$", name) and
                  int(re.search(r"ckpt-(\d+)", name).group(1)) >= 6
                  for name in gcs.list(f"{model_dir}/checkpoints")):
        assert job.poll() is None and time.time() < deadline
        time.sleep(0.2)
    job.send_signal(signal.SIGKILL)
    job.wait()
    # The newest checkpoint written whole (its index is written last), which the state file
    # may not name yet when the kill came between the two.
    latest = max(int(match.group(1)) for match in (
        re.search(r"ckpt-(\d+)\.index$", name) for name in gcs.list(f"{model_dir}/checkpoints"))
        if match)
    process = run(gcs, "trainer.task", *args)
    assert process.returncode == 0, process.stderr[-3000:]
    resumed = re.search(r"resuming at step (\d+) of", process.stdout)
    assert resumed and int(resumed.group(1)) == latest
    metrics = read_json(gcs, f"{model_dir}/metrics.json")
    assert metrics["resumed_from_step"] == int(resumed.group(1))
    assert [row["epoch"] for row in metrics["history"]] == list(range(1, 14))


@pytest.mark.parametrize("flag", ["--data=gs://no-such-bucket/photos",
                                  "--model_dir=gs://no-such-bucket/run",
                                  "--feature_cache=gs://no-such-bucket/features"])
def test_missing_bucket_is_a_one_line_error_without_hanging(gcs, flag, tmp_path):
    process = run(gcs, "trainer.task", "--data=demo", *JOB, flag, timeout=120,
                  cwd=str(tmp_path))
    assert process.returncode == 2
    assert "no-such-bucket" in error_line(process)
    # Found before anything else: no data line, no strategy line, nothing trained, and no
    # default ./runs/ folder made.
    assert process.stdout == "" and not os.listdir(tmp_path)


def test_prepare_into_gcs_then_train_from_the_shards(gcs, tmp_path):
    bucket = gcs.bucket("records")
    local = images.folder(str(tmp_path / "images"), per_class=10, validation_per_class=3,
                          size=32)
    output = f"{bucket}/colours"
    prepared = run(gcs, "trainer.prepare", f"--images={local}", f"--output={output}",
                   "--min_shards=2")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert "colours/dataset_info.json" in gcs.list(output)
    assert "colours/train-00001-of-00002.tfrecord" in gcs.list(output)
    # Shards in a bucket are read in parallel: still every record once per epoch over 2 workers.
    count_keys = ("import sys; from tests.test_prepare import keys_read_by_two_pipelines; "
                  "from trainer import sources; print(sorted(sum(keys_read_by_two_pipelines("
                  "sources.scan(sys.argv[1]).train, 4, False), [])))")
    keys = subprocess.run([sys.executable, "-c", count_keys, output], capture_output=True,
                          text=True, timeout=120, env=cli_env(**gcs.env), cwd=REPO)
    assert keys.stdout.strip() == str(list(range(20))), keys.stderr[-3000:]
    model_dir = str(tmp_path / "run")
    process = run(gcs, "trainer.task", f"--data={output}", f"--model_dir={model_dir}", *JOB,
                  "--cache_features=off", "--memory_budget_mb=0")
    assert process.returncode == 0, process.stderr[-3000:]
    with open(os.path.join(model_dir, "metrics.json")) as handle:
        metrics = json.load(handle)
    assert (metrics["train_images"], metrics["val_images"]) == (20, 6)


def test_tfds_dataset_in_a_gcs_data_dir(gcs, tmp_path):
    data_dir = f"{gcs.bucket('tfds')}/datasets"
    built = subprocess.run([sys.executable, os.path.join(REPO, "tests", "tiny_tfds.py"),
                            data_dir], capture_output=True, text=True, timeout=180,
                           env=cli_env(**gcs.env), cwd=REPO)
    assert built.returncode == 0, built.stderr[-3000:]
    assert any(name.endswith("dataset_info.json") for name in gcs.list(data_dir))
    model_dir = str(tmp_path / "run")
    process = run(gcs, "trainer.task", "--data=tfds:tiny_shapes", f"--tfds_data_dir={data_dir}",
                  "--tfds_train_split=train[:75%]", "--tfds_validation_split=train[75%:]",
                  f"--model_dir={model_dir}", *JOB, "--batch_size=6", "--memory_budget_mb=0",
                  f"--feature_cache={tmp_path / 'features'}")
    assert process.returncode == 0, process.stderr[-3000:]
    assert "validation 6 " in process.stdout and "train 18 " in process.stdout
    # Keyed by the split and the prepared dataset's info.
    assert "kept backbone features of small_cnn at 32 px" in process.stdout
    with open(os.path.join(model_dir, "metrics.json")) as handle:
        metrics = json.load(handle)
    assert metrics["epochs_completed"] == 4 and metrics["val_images"] == 6
    missing = run(gcs, "trainer.task", "--data=tfds:not_there", f"--tfds_data_dir={data_dir}",
                  f"--model_dir={tmp_path / 'other'}", *JOB)
    assert missing.returncode == 2
    assert "TFDS dataset not_there is not prepared in" in error_line(missing)


def test_an_outage_while_the_images_are_read_drops_no_image(gcs, tmp_path):
    bucket = gcs.bucket("outage-scan")
    local = images.folder(str(tmp_path / "data"), per_class=8, validation_per_class=2, size=32)
    images.save_corrupt(os.path.join(local, "train", "red", "bad.jpg"), "text")
    data = gcs.upload_tree(local, f"{bucket}/data")
    # Listings go through; the first reads of every object fail, more times than TensorFlow
    # retries by itself (GCS_RETRY_CONFIG_MAX_RETRIES=2), so the job's own retry must save it.
    gcs.fail_each(r"^GET /outage-scan/", times=3)
    try:
        process = run(gcs, "trainer.task", f"--data={data}", f"--model_dir={tmp_path / 'run'}",
                      *JOB, "--epochs=1", "--fine_tune_epochs=0")
    finally:
        gcs.end_outage()
    assert process.returncode == 0, process.stderr[-3000:]
    assert "failed to read in the pass but read fine alone (storage failing for a while?): " \
        "reading them again" in process.stderr
    with open(tmp_path / "run" / "metrics.json") as handle:
        metrics = json.load(handle)
    assert (metrics["train_images"] + metrics["val_images"], metrics["skipped_images"]) == (20, 1)


def test_storage_unreachable_at_start_up_names_the_bucket(gcs, tmp_path):
    bucket = gcs.bucket("outage-start")
    gcs.start_outage()
    try:
        process = run(gcs, "trainer.task", f"--data={bucket}/data",
                      f"--model_dir={tmp_path / 'run'}", *JOB, timeout=90)
    finally:
        gcs.end_outage()
    assert process.returncode == 2
    assert "cannot reach gs://outage-start/ (storage.googleapis.com)" in error_line(process)


def test_storage_lost_mid_training_stops_with_one_line_and_a_rerun_resumes(gcs, tmp_path):
    bucket = gcs.bucket("outage-train")
    model_dir = f"{bucket}/run"
    args = ["--data=demo", f"--model_dir={model_dir}", *JOB, "--epochs=8",
            "--storage_retry_seconds=4"]
    job = subprocess.Popen([sys.executable, "-m", "trainer.task", *args], cwd=REPO,
                           env=cli_env(**gcs.env), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while "run/checkpoints/checkpoint" not in gcs.list(model_dir):  # written after a save
        assert job.poll() is None and time.time() < deadline, job.communicate()
        time.sleep(0.2)
    gcs.start_outage()
    try:
        output, errors = job.communicate(timeout=180)
    finally:
        gcs.end_outage()
    assert job.returncode == 2, errors[-3000:]
    assert "storage failed for" in error_line(subprocess.CompletedProcess([], 2, output, errors))
    process = run(gcs, "trainer.task", *args)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "resuming at step" in process.stdout
    assert [row["epoch"] for row in read_json(gcs, f"{model_dir}/metrics.json")["history"]] == (
        list(range(1, 10)))


def test_training_outlasts_a_storage_failure_and_restores_past_a_half_written_checkpoint(
        gcs, tmp_path):
    """A real outage on the emulator, started and ended by the job's own writes: the writes of
    the epoch-2 checkpoint fail more often than TensorFlow retries (the job goes back to
    the epoch-1 checkpoint and trains on); the index of the epoch-3 one never arrives (the
    job stops with one line, its data file written), and the rerun restores the newest
    checkpoint that is whole."""
    bucket = gcs.bucket("outage-recover")
    model_dir = f"{bucket}/run"
    checkpoints = f"{model_dir}/checkpoints"
    args = ["--data=demo", f"--model_dir={model_dir}", *JOB, "--storage_retry_seconds=20"]
    steps = 45  # 360 demo images, batch 8
    # More failures than TensorFlow's tries (1 + 2 retries in tests), counted over all the
    # checkpoint's uploads, whose temporary names differ at each try.
    gcs.fail_each(rf"^POST /upload/.*(ckpt-{2 * steps})[._]", times=3)
    job = subprocess.Popen([sys.executable, "-m", "trainer.task", *args], cwd=REPO,
                           env=cli_env(**gcs.env), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while f"run/checkpoints/ckpt-{2 * steps}.index" not in gcs.list(checkpoints):
            assert job.poll() is None and time.time() < deadline, job.communicate()[1][-3000:]
            time.sleep(0.2)
        gcs.start_outage(rf"^POST /upload/.*ckpt-{3 * steps}\.index")
        output, errors = job.communicate(timeout=300)
    finally:
        gcs.end_outage()
    assert re.search(r"storage failed while training \(phase head\) \(.*\); trying again in "
                     r"1s", errors), errors[-3000:]
    # Epoch 2's line once, after its checkpoint was saved; epoch 3's never (its save failed).
    assert re.findall(r"^epoch (\d+)/4", output, re.M) == ["1", "2"], output
    assert job.returncode == 2, errors[-3000:]
    assert "storage failed for" in error_line(subprocess.CompletedProcess([], 2, output, errors))
    listed = gcs.list(checkpoints)
    assert (f"run/checkpoints/ckpt-{3 * steps}.data-00000-of-00001" in listed
            and f"run/checkpoints/ckpt-{3 * steps}.index" not in listed)  # half-written

    process = run(gcs, "trainer.task", *args)
    assert process.returncode == 0, process.stderr[-3000:]
    assert f"checkpoint {checkpoints}/ckpt-{3 * steps} cannot be read" in process.stderr
    assert f"resuming at step {2 * steps} of {4 * steps}" in process.stdout
    assert [row["epoch"] for row in read_json(gcs, f"{model_dir}/metrics.json")["history"]] == (
        [1, 2, 3, 4])


def test_a_second_job_on_a_model_dir_is_refused_and_a_killed_jobs_rerun_takes_over(gcs):
    bucket = gcs.bucket("two-jobs")
    model_dir = f"{bucket}/run"
    args = ["--data=demo", f"--model_dir={model_dir}", *JOB, "--epochs=3"]
    # The first job holds the lease, and renews it, for as long as the test needs: until it
    # is killed, however fast or slow the second one starts.
    first = subprocess.Popen(
        [sys.executable, "-c", "import sys; from trainer import lease\n"
         "with lease.held(sys.argv[1]):\n    print('holding', flush=True); sys.stdin.read()",
         model_dir], cwd=REPO, env=cli_env(**gcs.env), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "holding\n", first.stderr.read()
        second = run(gcs, "trainer.task", *args, timeout=120)
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    assert "another job is training in this --model_dir: " in error_line(second)
    # The killed job's lease names a process that is gone from this host: no wait.
    rerun = run(gcs, "trainer.task", *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "taking over the lease of a job that stopped" in rerun.stderr
    assert "run/.lease" not in gcs.list(model_dir)


def test_a_feature_cache_on_gcs_serves_later_jobs_and_a_damaged_entry_is_replaced(gcs, tmp_path):
    bucket = gcs.bucket("features")
    data = gcs.upload_tree(images.folder(str(tmp_path / "data"), per_class=8,
                                         validation_per_class=2, size=32), f"{bucket}/data")
    shared = f"{bucket}/feature_cache"

    def job(name):
        process = run(gcs, "trainer.task", f"--data={data}", f"--model_dir={bucket}/{name}",
                      f"--feature_cache={shared}", *JOB)
        assert process.returncode == 0, process.stderr[-3000:]
        return process

    first = job("one")
    assert "cached backbone features and activations" in first.stdout
    entries = sorted(gcs.list(shared))
    # An entry a phase, a chunk each of its train and validation rows.
    assert len(entries) == 4 and all(f"kept {what}" in first.stdout
                                     for what in ("backbone features", "activations"))
    second = job("two")
    # Found by one listing of the bucket: phase 2's activations are read when it starts.
    assert all(f"read {what} of 16 train and 4 validation images from --feature_cache "
               f"{shared}" in second.stdout
               for what in ("backbone features", "activations entering layer 10"))
    assert "kept" not in second.stdout
    blob = gcs.client().bucket("features").blob(entries[0])
    whole = blob.download_as_bytes()
    blob.upload_from_string(whole[:-10])  # cut short, as by a writer that was not atomic
    third = job("three")
    assert f"{shared}/{entries[0].split('/')[-1]} is damaged" in third.stderr
    assert "kept " in third.stdout  # published again, replacing the damaged generation
    assert gcs.client().bucket("features").blob(entries[0]).download_as_bytes() == whole


def test_feature_cache_publishes_on_gcs_are_conditional(gcs, monkeypatch):
    from trainer import cache
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.env["STORAGE_EMULATOR_HOST"])
    gcs.bucket("publish")
    shared = cache.SharedCache("gs://publish/cache")
    assert shared.read("entry") == (None, 0)
    assert shared.publish("entry", b"first", 0)
    assert not shared.publish("entry", b"second", 0)  # another trial published it first
    content, generation = shared.read("entry")
    assert content == b"first"
    assert not shared.publish("entry", b"stale", generation + 1)
    assert shared.publish("entry", b"replaced", generation)  # the damaged one it read
    assert shared.read("entry")[0] == b"replaced"
