#!/usr/bin/env bash
# Submits a Vertex AI hyperparameter tuning job over trainer.task, maximising val_accuracy.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/hptune.sh --preset=cpu|gpu|multiworker|tpu --project=P --region=R --bucket=gs://B
                         [options] [--dry-run] [-- trainer flags...]

Writes a HyperparameterTuningJob YAML and runs
`gcloud ai hp-tuning-jobs create --config=<file>`. Each trial runs trainer.task with the
trainer flags plus the tuned ones (--learning_rate, --fine_tune_at, --dropout by default);
the trainer reports val_accuracy through cloudml-hypertune. Trials share
--feature_cache=BUCKET/feature_cache, so that those with the same data, backbone and
weights run the backbone pass once between them; pass --feature_cache=... after -- to
use another folder, or --feature_cache= to keep none. The trainer flags, and each tuned
range's ends as a trial would get them, are checked before anything is submitted, as
submit_job.sh checks them.

Trials run our image for the preset, as submit_job.sh's jobs do (see its --help for the
one-time setup and scripts/build_image.sh).

Options: those of submit_job.sh (--preset --project --region --bucket --display_name
--image_uri --repository --tag --executor_image_uri --package --machine_type
--accelerator_type --accelerator_count --workers --tpu_topology --spec --dry-run), and:
  --max_trials=N              trials in all (default 12)
  --parallel_trials=N         trials at once (default 3)
  --learning_rate=MIN,MAX     log scale (default 1e-5,1e-3)
  --fine_tune_at=MIN,MAX      integer (default 60,140)
  --dropout=MIN,MAX           (default 0.1,0.5)
  --no_tune=NAME              leave one of learning_rate, fine_tune_at, dropout untuned
USAGE
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/common.sh
source "$here/common.sh"
common_defaults
max_trials=12 parallel_trials=3
declare -A ranges=([learning_rate]="1e-5,1e-3" [fine_tune_at]="60,140" [dropout]="0.1,0.5")

script_option() {
  case "$1" in
    --max_trials=*) max_trials="${1#*=}" ;;
    --parallel_trials=*) parallel_trials="${1#*=}" ;;
    --learning_rate=*|--fine_tune_at=*|--dropout=*) name="${1%%=*}"; ranges[${name#--}]="${1#*=}" ;;
    --no_tune=learning_rate|--no_tune=fine_tune_at|--no_tune=dropout) unset "ranges[${1#*=}]" ;;
    --no_tune=*) die "$1: only learning_rate, fine_tune_at and dropout are tuned" ;;
    *) return 1 ;;
  esac
}
parse_options "$@"

require_basics
[[ "$max_trials" =~ ^[0-9]+$ && "$parallel_trials" =~ ^[0-9]+$ ]] ||
  die "--max_trials and --parallel_trials must be numbers"
[[ "${#ranges[@]}" -gt 0 ]] || die "nothing left to tune"
if [[ " ${trainer_args[*]-} " != *" --feature_cache="* ]]; then
  trainer_args+=("--feature_cache=$bucket/feature_cache")
fi
worker_pool_specs "$preset" "${trainer_args[@]+"${trainer_args[@]}"}"
display_name="${display_name:-trainer-hptune-$preset-$(date -u +%Y%m%d-%H%M%S)}"
tuned=()
for name in "${!ranges[@]}"; do
  tuned+=("--tune=$name=${ranges[$name]}")
done
check_trainer_flags --base_output_dir="$bucket/jobs/$display_name" "${tuned[@]}" -- \
  "${pool_args[@]+"${pool_args[@]}"}"

parameter_yaml() {
  local name="$1" low="${2%,*}" high="${2#*,}"
  [[ "$low" =~ ^[0-9.eE+-]+$ && "$high" =~ ^[0-9.eE+-]+$ ]] ||
    die "--$name=$2 must be MIN,MAX numbers"
  echo "    - parameterId: $name"
  case "$name" in
    learning_rate)
      echo "      doubleValueSpec: {minValue: $low, maxValue: $high}"
      echo "      scaleType: UNIT_LOG_SCALE" ;;
    fine_tune_at)
      echo "      integerValueSpec: {minValue: '$low', maxValue: '$high'}"
      echo "      scaleType: UNIT_LINEAR_SCALE" ;;
    *)
      echo "      doubleValueSpec: {minValue: $low, maxValue: $high}"
      echo "      scaleType: UNIT_LINEAR_SCALE" ;;
  esac
}

spec="${spec:-$(mktemp "${TMPDIR:-/tmp}/hptune-job-XXXXXX.yaml")}"
{
  printf 'displayName: %s\n' "$(yaml_string "$display_name")"
  printf 'maxTrialCount: %s\nparallelTrialCount: %s\n' "$max_trials" "$parallel_trials"
  printf 'studySpec:\n  metrics:\n    - metricId: val_accuracy\n      goal: MAXIMIZE\n'
  printf '  parameters:\n'
  for name in learning_rate fine_tune_at dropout; do
    if [[ -n "${ranges[$name]+set}" ]]; then
      parameter_yaml "$name" "${ranges[$name]}"
    fi
  done
  printf 'trialJobSpec:\n  workerPoolSpecs:\n'
  printf '%s' "$pools_yaml" | sed 's/^/  /'
  printf '  baseOutputDirectory:\n    outputUriPrefix: %s\n' \
    "$(yaml_string "$bucket/jobs/$display_name")"
} >"$spec"

command=(gcloud ai hp-tuning-jobs create "--project=$project" "--region=$region"
         "--display-name=$display_name" "--max-trial-count=$max_trials"
         "--parallel-trial-count=$parallel_trials" "--config=$spec")
run_or_print "${command[@]}"
