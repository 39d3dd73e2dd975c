#!/usr/bin/env bash
# Submits a Vertex AI custom job that runs `python -m trainer.task` from the trainer package.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/submit_job.sh --preset=cpu|gpu|multiworker|tpu --project=P --region=R --bucket=gs://B
                             [options] [--dry-run] [-- trainer flags...]

Writes a CustomJobSpec YAML and runs `gcloud ai custom-jobs create --config=<file>`.
The job's base output directory is gs://B/jobs/<display name>, so Vertex AI sets
AIP_MODEL_DIR, AIP_CHECKPOINT_DIR and AIP_TENSORBOARD_LOG_DIR beneath it.

Options (environment variable in brackets):
  --preset=NAME            cpu | gpu | multiworker | tpu                     [PRESET]
  --project=P              Google Cloud project                            [GOOGLE_CLOUD_PROJECT]
  --region=R               Vertex AI region, e.g. us-central1              [REGION]
  --bucket=gs://B          staging and output bucket                       [BUCKET]
  --display_name=NAME      job name (default: trainer-<preset>-<UTC time>)
  --package=gs://...tar.gz the trainer source distribution
                           (default: gs://B/packages/trainer-<version>.tar.gz, from build_package.sh)
  --image_uri=URI          prebuilt TensorFlow training container            [IMAGE_URI]
  --machine_type=T         default: n1-standard-8 (tpu: ct5lp-hightpu-4t)  [MACHINE_TYPE]
  --accelerator_type=T     gpu default NVIDIA_TESLA_T4                     [ACCELERATOR_TYPE]
  --accelerator_count=N    GPUs per machine (gpu default 1)                [ACCELERATOR_COUNT]
  --workers=N              multiworker: workers besides the chief (default 2)
  --tpu_topology=T         tpu: TPU topology (default 2x2)
  --spec=FILE              where to write the spec (default: a new temporary file)
  --dry-run                write the spec and print the gcloud command; the spec's path is
                           the last line of output
  -h, --help               this help
Everything after -- is passed to trainer.task, e.g. -- --config=... --data=gs://B/photos
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
spec="${spec:-$(mktemp "${TMPDIR:-/tmp}/custom-job-XXXXXX.yaml")}"
{
  printf 'workerPoolSpecs:\n%s' "$pools_yaml"
  printf 'baseOutputDirectory:\n  outputUriPrefix: %s\n' "$(yaml_string "$bucket/jobs/$display_name")"
} >"$spec"

command=(gcloud ai custom-jobs create "--project=$project" "--region=$region"
         "--display-name=$display_name" "--config=$spec")
run_or_print "${command[@]}"
