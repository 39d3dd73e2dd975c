"""The check submit_job.sh and hptune.sh run before any gcloud call (trainer.preflight): the
trainer flags after `--`, parsed and resolved as the job on Vertex AI will."""

import glob
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, error_line, run_module
from tests.test_vertex import BASE, no_real_gcloud, offline_env, script  # noqa: F401 (fixture)

JOB = "--base_output_dir=gs://b/jobs/run-1"


def preflight(*args, env=None):
    return run_module("trainer.preflight", *args, env=env or offline_env(), timeout=60)


@pytest.mark.parametrize("args, message", [
    (["--epoch=1"], "Unknown command line flag 'epoch'"),
    (["--batch_size=-1"], "--batch_size=-1 must be positive"),
    (["--strategy=gpus"], "--strategy='gpus' is not one of"),
    (["--learning_rate=nan"], "--learning_rate=nan must be a finite number"),
    (["epochs=3"], "unexpected argument 'epochs=3'"),
    (["--data=./cats"], "--data=./cats is a local path"),
    (["--data=gs://b/cats", "--model_dir=runs/cats"], "--model_dir=runs/cats is a local path"),
    (["--data=gs://b/cats", "--feature_cache=/tmp/features"], "--feature_cache=/tmp/features"),
    (["--data=tfds:cats_vs_dogs", "--tfds_data_dir=/data/tfds"], "--tfds_data_dir=/data/tfds"),
    (["--data=gs://b/cats", "--base_weights=weights.h5"], "--base_weights=weights.h5"),
    (["--config=configs/cats_vs_dogs.yaml"], "is a local file, which the job on Vertex AI"),
    (["--config=configs/missing.yaml"], "config file configs/missing.yaml not found"),
])
def test_a_job_that_could_not_start_is_one_line(args, message):
    process = preflight(JOB, "--", *args)
    assert process.returncode == 2
    line = error_line(process)
    assert line.startswith("error: trainer flags after --: ") and message in line, line


@pytest.mark.parametrize("args", [
    [],  # the smoke job on generated data
    ["--data=gs://b/cats", "--epochs=3", "--feature_cache=gs://b/features"],
    ["--data=/gcs/b/cats", "--model_dir=/gcs/b/runs/cats", "--base_weights=/gcs/b/w.h5"],
    ["--data=tfds:cats_vs_dogs", "--tfds_data_dir=gs://b/tfds", "--strategy=tpu", "--tpu=local"],
])
def test_a_job_that_can_start_passes_without_tensorflow(args):
    code = ("import sys; from trainer import preflight; status = preflight.main(sys.argv[1:]); "
            "assert 'tensorflow' not in sys.modules; sys.exit(status)")
    process = subprocess.run([sys.executable, "-c", code, JOB, "--", *args], capture_output=True,
                             text=True, env=offline_env(), cwd=REPO, timeout=60)
    assert process.returncode == 0, process.stderr
    assert process.stderr == ""


@pytest.mark.parametrize("tune, message", [
    ("dropot=0.1,0.5", "tuned parameter dropot is not a trainer flag"),
    ("dropout=0.1,1.5", "tuned parameter dropout=1.5, an end of its range: --dropout=1.5 must"),
    ("learning_rate=0,1e-3", "--learning_rate=0.0 must be positive"),
    ("fine_tune_at=60.5,140", "tuned parameter fine_tune_at=60.5"),
    ("dropout=0.5,0.1", "has MIN above MAX"),
])
def test_tuned_ranges_are_checked_at_both_ends(tune, message):
    process = preflight(JOB, f"--tune={tune}", "--", "--data=gs://b/cats")
    assert process.returncode == 2
    assert message in error_line(process)


def test_presets_are_read_from_their_bucket(gcs, tmp_path):
    bucket = gcs.bucket("preflight-presets")
    gcs.upload_tree(os.path.join(REPO, "configs"), f"{bucket}/configs")
    env = offline_env(**gcs.env)
    presets = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
    assert presets
    for path in presets:
        preset = f"{bucket}/configs/{os.path.basename(path)}"
        process = preflight(JOB, "--", f"--config={preset}", f"--data={bucket}/cats", env=env)
        assert process.returncode == 0, process.stderr
        assert process.stderr == ""
    missing = preflight(JOB, "--", f"--config={bucket}/configs/nope.yaml", env=env)
    assert missing.returncode == 2
    assert f"config file {bucket}/configs/nope.yaml not found" in error_line(missing)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "bad.yaml").write_text("data: ./photos\nepochs: 3\n")
    gcs.upload_tree(str(tmp_path / "bad"), f"{bucket}/bad")
    local_data = preflight(JOB, "--", f"--config={bucket}/bad/bad.yaml", env=env)
    assert "--data=./photos is a local path" in error_line(local_data)


def test_without_credentials_a_gs_preset_is_left_to_the_job():
    process = preflight(JOB, "--", "--config=gs://b/configs/cats.yaml", "--data=gs://b/cats")
    assert process.returncode == 0, process.stderr
    assert "no application-default credentials here to read --config=gs://b/configs/cats.yaml" \
        in process.stderr


@pytest.mark.parametrize("preset", ["cpu", "gpu", "multiworker", "tpu"])
@pytest.mark.parametrize("dry_run", [True, False])
def test_submit_job_stops_a_typo_before_gcloud(preset, dry_run, tmp_path):
    spec = tmp_path / "spec.yaml"
    process = script("submit_job.sh", f"--preset={preset}", *BASE, f"--spec={spec}",
                     *(["--dry-run"] if dry_run else []), "--", "--data=gs://b/cats", "--epoch=1")
    assert process.returncode == 2
    assert "Unknown command line flag 'epoch'" in error_line(process)
    # The stand-in gcloud (tests/test_vertex.py) would say so had it been called.
    assert "gcloud called in a test" not in process.stderr
    assert not spec.exists() and process.stdout == ""


@pytest.mark.parametrize("dry_run", [True, False])
def test_hptune_stops_a_bad_flag_or_range_before_gcloud(dry_run, tmp_path):
    spec = tmp_path / "spec.yaml"
    common = ["--preset=gpu", *BASE, f"--spec={spec}", *(["--dry-run"] if dry_run else [])]
    typo = script("hptune.sh", *common, "--", "--data=gs://b/cats", "--fine_tune_epoch=3")
    assert "Unknown command line flag 'fine_tune_epoch'" in error_line(typo)
    local = script("hptune.sh", *common, "--", "--data=gs://b/cats", "--feature_cache=/tmp/f")
    assert "--feature_cache=/tmp/f is a local path" in error_line(local)
    wide = script("hptune.sh", *common, "--fine_tune_at=-5,140", "--", "--data=gs://b/cats")
    assert "tuned parameter fine_tune_at=-5" in error_line(wide)
    for process in (typo, local, wide):
        assert process.returncode == 2 and "gcloud called in a test" not in process.stderr
    assert not spec.exists()


def test_the_scripts_say_what_the_check_needs(tmp_path):
    """A Python without the trainer's dependencies: one line saying what to install."""
    bare = tmp_path / "python3"
    bare.write_text("#!/bin/sh\nexec /usr/bin/env -i /bin/false\n")
    bare.chmod(0o755)
    process = script("submit_job.sh", "--preset=cpu", *BASE, "--dry-run", "--",
                     "--data=gs://b/cats", env=offline_env(PYTHON=str(bare)))
    assert process.returncode == 2
    assert "needs the trainer's dependencies: pip install -e ." in error_line(process)


def test_a_preset_bucket_out_of_reach_is_one_line():
    nothing_there = offline_env(STORAGE_EMULATOR_HOST="http://127.0.0.1:9")
    process = preflight(JOB, "--", "--config=gs://b/configs/cats.yaml", env=nothing_there)
    assert process.returncode == 2
    assert "cannot read --config=gs://b/configs/cats.yaml (" in error_line(process)
