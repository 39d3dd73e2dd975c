#!/usr/bin/env bash
# Submits a Vertex AI custom job that runs `python -m trainer.task` in our training image.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/submit_job.sh --preset=cpu|gpu|multiworker|tpu --project=P --region=R --bucket=gs://B
                             [options] [--dry-run] [-- trainer flags...]

Writes a CustomJobSpec YAML and runs `gcloud ai custom-jobs create --config=<file>`. Every
pool runs our image for the preset (containerSpec), built by scripts/build_image.sh:
R-docker.pkg.dev/P/trainer/trainer-{cpu,gpu,tpu}:<version>-<git short hash>, the tag
build_image.sh gives it from this checkout; the trainer flags are the container's args.
The job's base output directory is gs://B/jobs/<display name>, so Vertex AI sets
AIP_MODEL_DIR, AIP_CHECKPOINT_DIR and AIP_TENSORBOARD_LOG_DIR beneath it.

One-time setup: enable the APIs and create the image repository (see build_image.sh --help):
  gcloud services enable artifactregistry.googleapis.com cloudbuild.googleapis.com aiplatform.googleapis.com
  gcloud artifacts repositories create trainer --repository-format=docker --location=R
then build the images: scripts/build_image.sh --accelerator=cpu|gpu|tpu --project=P --region=R

Options (environment variable in brackets):
  --preset=NAME            cpu | gpu | multiworker | tpu                     [PRESET]
  --project=P              Google Cloud project                            [GOOGLE_CLOUD_PROJECT]
  --region=R               Vertex AI region, e.g. us-central1              [REGION]
  --bucket=gs://B          staging and output bucket                       [BUCKET]
  --display_name=NAME      job name (default: trainer-<preset>-<UTC time>)
  --image_uri=URI          run this image instead of ours                   [IMAGE_URI]
  --repository=NAME        Artifact Registry repository of our images (default trainer)
  --tag=T                  tag of our images (default <version>-<git short hash>)
  --executor_image_uri=URI run the trainer package (--package) in this prebuilt image
                           (pythonPackageSpec) instead; Google's prebuilt TensorFlow
                           training images stop at TF 2.17
  --package=gs://...tar.gz with --executor_image_uri: the trainer source distribution
                           (default: gs://B/packages/trainer-<version>.tar.gz, from build_package.sh)
  --machine_type=T         default: n1-standard-8 (tpu: ct5lp-hightpu-4t, TPU v5e; TPU v6e
                           cannot train TensorFlow on Vertex AI)               [MACHINE_TYPE]
  --accelerator_type=T     gpu default NVIDIA_TESLA_T4                     [ACCELERATOR_TYPE]
  --accelerator_count=N    GPUs per machine (gpu default 1)                [ACCELERATOR_COUNT]
  --workers=N              multiworker: workers besides the chief (default 2)
  --tpu_topology=T         tpu: TPU topology (default 2x2)
  --spec=FILE              where to write the spec (default: a new temporary file)
  --dry-run                write the spec and print the gcloud command; the spec's path is
                           the last line of output
  -h, --help               this help
Everything after -- is passed to trainer.task, e.g. -- --config=... --data=gs://B/photos.
Before anything is submitted, those flags are checked as the job will parse them (python -m
trainer.preflight, which needs this checkout's dependencies: pip install -e .): an unknown
flag, a bad value, a missing preset, or a local path where the job needs gs:// (--data,
--model_dir, --config, --feature_cache, --tfds_data_dir, --base_weights) is one error line.
USAGE
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/common.sh
source "$here/common.sh"
common_defaults

script_option() { return 1; }  # only the shared options
parse_options "$@"

require_basics
worker_pool_specs "$preset" "${trainer_args[@]+"${trainer_args[@]}"}"
display_name="${display_name:-trainer-$preset-$(date -u +%Y%m%d-%H%M%S)}"
check_trainer_flags --base_output_dir="$bucket/jobs/$display_name" -- \
  "${pool_args[@]+"${pool_args[@]}"}"

spec="${spec:-$(mktemp "${TMPDIR:-/tmp}/custom-job-XXXXXX.yaml")}"
{
  printf 'workerPoolSpecs:\n%s' "$pools_yaml"
  printf 'baseOutputDirectory:\n  outputUriPrefix: %s\n' "$(yaml_string "$bucket/jobs/$display_name")"
} >"$spec"

command=(gcloud ai custom-jobs create "--project=$project" "--region=$region"
         "--display-name=$display_name" "--config=$spec")
run_or_print "${command[@]}"
