"""Vertex AI: job specs checked against the real client library's types, packaging, and the
trainer's cloud conventions (AIP_* directories on gs://, hyperparameter tuning reports)."""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import yaml
from google.cloud import aiplatform_v1

from tests import images
from tests.conftest import REPO, cli_env, run_module, unavailable
from tests.gcs import free_port, write_certificates

SCRIPTS = os.path.join(REPO, "scripts")
BASE = ["--project=my-project", "--region=us-central1", "--bucket=gs://my bucket"]


@pytest.fixture(autouse=True)
def no_real_gcloud(tmp_path, monkeypatch):
    """Scripts under test must never reach the real gcloud: a stand-in that fails comes first.
    What they write to the temp dir (specs, build configs) stays in the test's."""
    stand_in = tmp_path / "bin" / "gcloud"
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\necho 'gcloud called in a test' >&2\nexit 99\n")
    stand_in.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stand_in.parent}:{os.environ['PATH']}")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))


def script(name, *args, env=None):
    return subprocess.run(["bash", os.path.join(SCRIPTS, name), *args], capture_output=True,
                          text=True, timeout=120, env=env or offline_env(), cwd=REPO)


def offline_env(**extra):
    """No credentials of this machine's, and no GCE metadata server to ask for them: the
    scripts' flag check then leaves a gs:// preset unread, as for a user without ADC."""
    env = cli_env(NO_GCE_CHECK="true", GCE_METADATA_HOST="127.0.0.1:9",
                  CLOUDSDK_CONFIG="/nonexistent", PYTHON=sys.executable)
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    env.pop("STORAGE_EMULATOR_HOST", None)
    return {**env, **extra}


def dry_run(name, *args):
    """Runs a script with --dry-run (placed before the trainer flags' --)."""
    split = args.index("--") if "--" in args else len(args)
    process = script(name, *args[:split], "--dry-run", *args[split:])
    assert process.returncode == 0, process.stderr
    spec = process.stdout.splitlines()[-1]
    with open(spec) as handle:
        return process.stdout, yaml.safe_load(handle)


@pytest.mark.parametrize("preset, pools, machine, accelerator, extra_args", [
    ("cpu", [1], "n1-standard-8", None, []),
    ("gpu", [1], "n1-standard-8", ("NVIDIA_TESLA_T4", 2), ["--strategy=gpu"]),
    ("multiworker", [1, 3], "n1-standard-8", None, []),
    ("tpu", [1], "ct5lp-hightpu-4t", None, ["--strategy=tpu", "--tpu=local"]),
])
def test_submit_job_spec_parses_as_a_custom_job_spec(preset, pools, machine, accelerator,
                                                     extra_args, tmp_path):
    trainer_flags = ["--config=gs://my bucket/cats.yaml",
                     '--data=gs://my bucket/cats photos, quote"and\\backslash']
    output, spec = dry_run("submit_job.sh", f"--preset={preset}", *BASE, "--display_name=run 1",
                           "--accelerator_count=2", "--workers=3", "--", *trainer_flags)
    job = aiplatform_v1.CustomJobSpec.from_json(json.dumps(spec))
    assert [pool.replica_count for pool in job.worker_pool_specs] == pools
    image = "gpu" if preset == "gpu" else "tpu" if preset == "tpu" else "cpu"
    for pool in job.worker_pool_specs:
        # Our own image for the preset, tagged as build_image.sh tags it from this checkout.
        assert re.fullmatch(rf"us-central1-docker\.pkg\.dev/my-project/trainer/trainer-{image}:"
                            r"0\.1\.0-[0-9a-f]+", pool.container_spec.image_uri)
        assert list(pool.container_spec.args) == extra_args + trainer_flags
        assert not pool.python_package_spec.executor_image_uri
        assert pool.machine_spec.machine_type == machine
        if accelerator:
            assert (pool.machine_spec.accelerator_type.name,
                    pool.machine_spec.accelerator_count) == accelerator
        else:
            assert pool.machine_spec.accelerator_count == 0
    if preset == "tpu":
        assert job.worker_pool_specs[0].machine_spec.tpu_topology == "2x2"
    assert job.base_output_directory.output_uri_prefix == "gs://my bucket/jobs/run 1"
    command = output.splitlines()[-2]
    assert command.startswith("gcloud ai custom-jobs create --project=my-project ")
    assert "--display-name=run\\ 1" in command and "--config=" in command


def test_a_prebuilt_executor_image_runs_the_package_with_a_warning():
    process = script("submit_job.sh", "--preset=cpu", *BASE, "--dry-run",
                     "--executor_image_uri=us-docker.pkg.dev/vertex-ai/training/tf-cpu.2-17.py310:latest",
                     "--", "--data=gs://b/photos")
    assert process.returncode == 0, process.stderr
    assert "prebuilt TensorFlow training images stop at TF 2.17" in process.stderr
    with open(process.stdout.splitlines()[-1]) as handle:
        job = aiplatform_v1.CustomJobSpec.from_json(json.dumps(yaml.safe_load(handle)))
    pool, = job.worker_pool_specs
    assert pool.python_package_spec.python_module == "trainer.task"
    assert list(pool.python_package_spec.package_uris) == [
        "gs://my bucket/packages/trainer-0.1.0.tar.gz"]
    assert list(pool.python_package_spec.args) == ["--data=gs://b/photos"]
    assert not pool.container_spec.image_uri


def test_tpu_v6e_is_refused_for_tensorflow():
    process = script("submit_job.sh", "--preset=tpu", *BASE, "--machine_type=ct6e-standard-4t",
                     "--dry-run")
    assert process.returncode == 2
    assert "TPU v6e, where Vertex AI does not support TensorFlow training" in process.stderr


@pytest.mark.parametrize("accelerator", ["cpu", "gpu", "tpu"])
def test_build_image_on_cloud_build_prints_the_image_uri_last(accelerator):
    process = script("build_image.sh", f"--accelerator={accelerator}", "--project=my-project",
                     "--region=europe-west4", "--tag=v1", "--dry-run")
    assert process.returncode == 0, process.stderr
    command, uri = process.stdout.splitlines()[-2:]
    assert uri == f"europe-west4-docker.pkg.dev/my-project/trainer/trainer-{accelerator}:v1"
    assert command.startswith("gcloud builds submit --project=my-project "
                              "--region=europe-west4 --config=")
    config = yaml.safe_load(open(re.search(r"--config=(\S+)", command).group(1)))
    step, = config["steps"]
    assert step["args"] == ["build", "-f", "containers/Dockerfile", "--build-arg",
                            f"ACCELERATOR={accelerator}", "-t", uri, "."]
    assert config["images"] == [uri]


def test_build_image_locally_and_its_errors():
    process = script("build_image.sh", "--accelerator=cpu", "--project=p", "--region=r",
                     "--local", "--base_image=debian-python:12", "--dry-run",
                     env=cli_env(ENGINE="podman"))
    assert process.returncode == 0, process.stderr
    build, push, uri = process.stdout.splitlines()[-3:]
    assert re.fullmatch(r"r-docker\.pkg\.dev/p/trainer/trainer-cpu:0\.1\.0-[0-9a-f]+", uri)
    assert build.split()[:2] == ["podman", "build"] and f"-t {uri}" in build
    assert "--build-arg BASE_IMAGE=debian-python:12" in build
    assert push.strip() == f"podman push {uri}"
    process = script("build_image.sh", "--accelerator=v6e", "--project=p", "--region=r")
    assert process.returncode == 2 and "--accelerator=v6e is not one of cpu, gpu, tpu" in (
        process.stderr)


def test_trainer_flags_are_passed_as_they_are_to_every_pool():
    # Words the script itself uses in the spec's text must not be rewritten in the flags.
    flags = ["--data=gs://b/REPLICAS", "--model_dir=gs://b/replicaCount: 9"]
    _, spec = dry_run("submit_job.sh", "--preset=multiworker", *BASE, "--workers=4", "--", *flags)
    job = aiplatform_v1.CustomJobSpec.from_json(json.dumps(spec))
    assert [pool.replica_count for pool in job.worker_pool_specs] == [1, 4]
    assert [list(pool.container_spec.args) for pool in job.worker_pool_specs] == [flags] * 2


def test_hptune_spec_parses_as_a_hyperparameter_tuning_job():
    _, spec = dry_run("hptune.sh", "--preset=gpu", *BASE, "--display_name=tune",
                      "--max_trials=8", "--parallel_trials=2", "--dropout=0.2,0.4",
                      "--", "--data=gs://b/photos")
    job = aiplatform_v1.HyperparameterTuningJob.from_json(json.dumps(spec))
    assert (job.display_name, job.max_trial_count, job.parallel_trial_count) == ("tune", 8, 2)
    metric, = job.study_spec.metrics
    assert (metric.metric_id, metric.goal.name) == ("val_accuracy", "MAXIMIZE")
    parameters = {p.parameter_id: p for p in job.study_spec.parameters}
    assert set(parameters) == {"learning_rate", "fine_tune_at", "dropout"}
    assert parameters["learning_rate"].scale_type.name == "UNIT_LOG_SCALE"
    assert parameters["fine_tune_at"].integer_value_spec.max_value == 140
    assert parameters["dropout"].double_value_spec.min_value == pytest.approx(0.2)
    pool, = job.trial_job_spec.worker_pool_specs
    # Trials share the backbone pass through a feature cache in the job's bucket.
    assert list(pool.container_spec.args) == ["--strategy=gpu", "--data=gs://b/photos",
                                              "--feature_cache=gs://my bucket/feature_cache"]
    assert "/trainer/trainer-gpu:" in pool.container_spec.image_uri
    assert job.trial_job_spec.base_output_directory.output_uri_prefix == "gs://my bucket/jobs/tune"


@pytest.mark.parametrize("given", ["--feature_cache=gs://other/features", "--feature_cache="])
def test_hptune_keeps_a_feature_cache_given_or_turned_off(given):
    _, spec = dry_run("hptune.sh", "--preset=cpu", *BASE, "--", "--data=gs://b/photos", given)
    pool, = spec["trialJobSpec"]["workerPoolSpecs"]
    assert pool["containerSpec"]["args"][-2:] == ["--data=gs://b/photos", given]


@pytest.mark.parametrize("args, message", [
    (["--project=p", "--region=r", "--bucket=gs://b"], "--preset is required"),
    (["--preset=huge", "--project=p", "--region=r", "--bucket=gs://b"], "--preset=huge is not"),
    (["--preset=cpu", "--region=r", "--bucket=gs://b"], "--project"),
    (["--preset=cpu", "--project=p", "--region=r", "--bucket=/local"], "must be a gs:// URL"),
    (["--preset=cpu", "--project=p", "--region=r", "--bucket=gs://b", "--frobnicate"],
     "unknown option --frobnicate"),
])
def test_submit_job_argument_errors(args, message):
    process = script("submit_job.sh", "--dry-run", *args)
    assert process.returncode == 2 and message in process.stderr
    assert len(process.stderr.strip().splitlines()) == 1


def test_scripts_have_help():
    for name in ("submit_job.sh", "hptune.sh", "build_package.sh", "build_image.sh",
                 "local_run.sh", "prepare_data.sh"):
        process = script(name, "--help")
        assert process.returncode == 0 and process.stdout.startswith("Usage:"), name


@pytest.mark.slow
def test_package_installs_into_a_fresh_venv_and_runs(tmp_path):
    process = script("build_package.sh", f"--dist={tmp_path / 'dist'}",
                     env=cli_env(PYTHON=sys.executable))
    assert process.returncode == 0, process.stderr
    package = process.stdout.splitlines()[-1]
    assert package.endswith("trainer-0.1.0.tar.gz")
    with tarfile.open(package) as archive:
        assert "trainer-0.1.0/trainer/task.py" in archive.getnames()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", package], check=True,
                   capture_output=True)
    # TensorFlow and the rest come from this environment, as they come from the container on
    # Vertex AI; the trainer itself must come from the fresh install.
    site = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    outer = subprocess.check_output([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    with open(os.path.join(site, "outer.pth"), "w") as handle:
        handle.write(outer + "\n")
    env = {key: value for key, value in cli_env().items() if key != "PYTHONPATH"}
    where = subprocess.run([python, "-c", "import trainer; print(trainer.__file__)"],
                           capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert where.stdout.startswith(str(venv)), where
    helped = subprocess.run([python, "-m", "trainer.task", "--help"], capture_output=True,
                            text=True, cwd=str(tmp_path), env=env, timeout=120)
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "--strategy" in helped.stdout and "--base_weights" in helped.stdout


@pytest.mark.slow
def test_package_uploads_to_a_bucket(gcs, tmp_path):
    bucket = gcs.bucket("packages")
    env = cli_env(PYTHON=sys.executable, **gcs.env)
    process = script("build_package.sh", f"--bucket={bucket}", f"--dist={tmp_path}",
                     "--uploader=python", env=env)
    assert process.returncode == 0, process.stderr
    assert process.stdout.splitlines()[-1] == f"{bucket}/packages/trainer-0.1.0.tar.gz"
    assert gcs.list(bucket) == ["packages/trainer-0.1.0.tar.gz"]


@pytest.mark.slow
def test_trainer_writes_where_vertex_says(gcs, tmp_path):
    bucket = gcs.bucket("vertex-job")
    base = f"{bucket}/jobs/job-1"
    metric_file = tmp_path / "hypertune" / "output.metrics"
    env = cli_env(AIP_MODEL_DIR=f"{base}/model", AIP_CHECKPOINT_DIR=f"{base}/checkpoints",
                  AIP_TENSORBOARD_LOG_DIR=f"{base}/logs",
                  CLOUD_ML_HP_METRIC_FILE=str(metric_file), **gcs.env)
    data = images.folder(str(tmp_path / "data"), per_class=8, validation_per_class=2, size=32)
    process = run_module("trainer.task", f"--data={data}", "--backbone=small_cnn",
                         "--base_weights=none", "--image_size=32", "--epochs=1",
                         "--fine_tune_epochs=1", "--batch_size=8", env=env)
    assert process.returncode == 0, process.stderr[-3000:]
    written = gcs.list(base)
    assert "jobs/job-1/model/export/saved_model.pb" in written
    assert "jobs/job-1/model/metrics.json" in written
    assert any(name.startswith("jobs/job-1/checkpoints/ckpt-") for name in written)
    assert any(name.startswith("jobs/job-1/logs/train/events") for name in written)
    assert not any(name.startswith("jobs/job-1/model/checkpoints") for name in written)
    reported = json.loads(metric_file.read_text().splitlines()[-1])
    metrics = json.loads(gcs.client().bucket("vertex-job").blob(
        "jobs/job-1/model/metrics.json").download_as_bytes())
    assert float(reported["val_accuracy"]) == metrics["val_accuracy"]  # what the trial scored


def test_scripts_pass_shellcheck():
    if not shutil.which("shellcheck"):
        unavailable("shellcheck is not installed (apt-get install shellcheck); CI installs it")
    scripts = sorted(os.path.join(SCRIPTS, name) for name in os.listdir(SCRIPTS)
                     if name.endswith(".sh"))
    process = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True,
                             cwd=REPO)
    assert process.returncode == 0, process.stdout


@pytest.fixture(scope="module")
def google_apis(tmp_path_factory):
    """The real gcloud, in a throwaway configuration, sending to the stand-in of
    tests/google_apis.py on 127.0.0.1; yields (env, read_requests)."""
    gcloud = shutil.which("gcloud", path="/usr/bin:/usr/local/bin:/usr/lib/google-cloud-sdk/bin")
    if not gcloud:
        unavailable("the Google Cloud CLI (gcloud) is not installed")
    folder = tmp_path_factory.mktemp("google_apis")
    certificates = write_certificates(str(folder), ("*.googleapis.com",))
    port, record = free_port(), folder / "requests.jsonl"
    stand_in = subprocess.Popen([sys.executable, "-m", "tests.google_apis", str(port),
                                 certificates["cert"], certificates["key"], str(record)],
                                cwd=REPO, stdout=subprocess.PIPE, text=True)
    stand_in.stdout.readline()  # "ready"
    (folder / "token").write_text("a-fake-access-token\n")
    env = cli_env(
        PATH=f"{os.path.dirname(gcloud)}:/usr/bin:/bin", CLOUDSDK_CONFIG=str(folder / "gcloud"),
        CLOUDSDK_AUTH_ACCESS_TOKEN_FILE=str(folder / "token"),
        CLOUDSDK_PROXY_TYPE="http", CLOUDSDK_PROXY_ADDRESS="127.0.0.1",
        CLOUDSDK_PROXY_PORT=str(port), CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE=certificates["ca"],
        CLOUDSDK_CORE_DISABLE_PROMPTS="1", CLOUDSDK_CORE_DISABLE_USAGE_REPORTING="true",
        CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK="true",
        CLOUDSDK_CORE_CHECK_GCE_METADATA="false", NO_GCE_CHECK="true", PYTHON=sys.executable)

    def requests():
        lines = record.read_text().splitlines() if record.exists() else []
        record.write_text("")
        return [json.loads(line) for line in lines]

    yield env, requests
    stand_in.terminate()
    stand_in.wait(timeout=10)


def _real_gcloud(google_apis, name, *args):
    env, requests = google_apis
    requests()
    process = script(name, *args, env={**env, "TMPDIR": os.environ["TMPDIR"]})
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-3000:]
    return process, requests()


@pytest.mark.slow
@pytest.mark.parametrize("preset, image, pools", [
    ("cpu", "cpu", [1]), ("gpu", "gpu", [1]), ("multiworker", "cpu", [1, 2]), ("tpu", "tpu", [1])])
def test_the_real_gcloud_creates_the_custom_job_we_meant(google_apis, preset, image, pools):
    _, sent = _real_gcloud(google_apis, "submit_job.sh", f"--preset={preset}", *BASE,
                           "--display_name=run 1", "--tag=v1", "--", "--data=gs://b/cats")
    request, = sent
    assert (request["method"], request["host"], request["path"]) == (
        "POST", "us-central1-aiplatform.googleapis.com",
        "/v1/projects/my-project/locations/us-central1/customJobs?alt=json")
    job = aiplatform_v1.CustomJob.from_json(request["body"], ignore_unknown_fields=False)
    assert job.display_name == "run 1"
    assert [pool.replica_count for pool in job.job_spec.worker_pool_specs] == pools
    for pool in job.job_spec.worker_pool_specs:
        assert pool.container_spec.image_uri == (
            f"us-central1-docker.pkg.dev/my-project/trainer/trainer-{image}:v1")
        assert list(pool.container_spec.args)[-1] == "--data=gs://b/cats"
    assert job.job_spec.base_output_directory.output_uri_prefix == "gs://my bucket/jobs/run 1"


@pytest.mark.slow
def test_the_real_gcloud_creates_the_tuning_job_we_meant(google_apis):
    _, sent = _real_gcloud(google_apis, "hptune.sh", "--preset=gpu", *BASE, "--display_name=tune",
                           "--tag=v1", "--max_trials=4", "--", "--data=gs://b/cats")
    request, = sent
    assert (request["method"], request["path"]) == (
        "POST", "/v1/projects/my-project/locations/us-central1/hyperparameterTuningJobs?alt=json")
    job = aiplatform_v1.HyperparameterTuningJob.from_json(request["body"],
                                                          ignore_unknown_fields=False)
    assert (job.display_name, job.max_trial_count) == ("tune", 4)
    pool, = job.trial_job_spec.worker_pool_specs
    assert pool.container_spec.image_uri.endswith("/trainer/trainer-gpu:v1")


@pytest.mark.slow
def test_the_real_gcloud_submits_the_image_build_we_meant(google_apis):
    process, sent = _real_gcloud(google_apis, "build_image.sh", "--accelerator=tpu",
                                 "--project=my-project", "--region=us-central1", "--tag=v1")
    uri = "us-central1-docker.pkg.dev/my-project/trainer/trainer-tpu:v1"
    assert process.stdout.splitlines()[-1] == uri
    upload = next(r for r in sent if r["path"].startswith("/upload/storage/v1/b/"))
    assert upload["path"].startswith("/upload/storage/v1/b/my-project_cloudbuild/o?")
    build, = [r for r in sent if r["method"] == "POST" and r["host"] == "cloudbuild.googleapis.com"]
    assert build["path"] == "/v1/projects/my-project/locations/us-central1/builds?alt=json"
    body = json.loads(build["body"])
    assert body["images"] == [uri]
    step, = body["steps"]
    assert step["name"] == "gcr.io/cloud-builders/docker"
    assert step["args"] == ["build", "-f", "containers/Dockerfile", "--build-arg",
                            "ACCELERATOR=tpu", "-t", uri, "."]
    assert body["source"]["storageSource"]["bucket"] == "my-project_cloudbuild"
