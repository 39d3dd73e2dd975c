# Shared by submit_job.sh and hptune.sh: option parsing and checks, and the worker pool YAML.
# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154  # variables shared with the scripts that source this

DEFAULT_CPU_IMAGE="us-docker.pkg.dev/vertex-ai/training/tf-cpu.2-17.py310:latest"
DEFAULT_GPU_IMAGE="us-docker.pkg.dev/vertex-ai/training/tf-gpu.2-17.py310:latest"
DEFAULT_TPU_IMAGE="us-docker.pkg.dev/vertex-ai/training/tf-tpu.2-17.py310:latest"

die() { echo "error: $*" >&2; exit 2; }

# The options submit_job.sh and hptune.sh share, with their defaults.
common_defaults() {
  preset="${PRESET:-}" project="${GOOGLE_CLOUD_PROJECT:-}" region="${REGION:-}" bucket="${BUCKET:-}"
  display_name="" package="" image_uri="${IMAGE_URI:-}" machine_type="${MACHINE_TYPE:-}"
  accelerator_type="${ACCELERATOR_TYPE:-}" accelerator_count="${ACCELERATOR_COUNT:-}"
  workers=2 tpu_topology="2x2" spec="" dry_run=false trainer_args=()
}

# Takes one option of both scripts; returns 1 for any other.
common_option() {
  case "$1" in
    --preset=*) preset="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --region=*) region="${1#*=}" ;;
    --bucket=*) bucket="${1#*=}" ;;
    --display_name=*) display_name="${1#*=}" ;;
    --package=*) package="${1#*=}" ;;
    --image_uri=*) image_uri="${1#*=}" ;;
    --machine_type=*) machine_type="${1#*=}" ;;
    --accelerator_type=*) accelerator_type="${1#*=}" ;;
    --accelerator_count=*) accelerator_count="${1#*=}" ;;
    --workers=*) workers="${1#*=}" ;;
    --tpu_topology=*) tpu_topology="${1#*=}" ;;
    --spec=*) spec="${1#*=}" ;;
    --dry-run) dry_run=true ;;
    *) return 1 ;;
  esac
}

# Parses the command line: the script's own options (script_option, which returns 1 for any
# other), then the shared ones; everything after -- goes to trainer.task.
parse_options() {
  while (($#)); do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --) shift; trainer_args=("$@"); break ;;
      *) script_option "$1" || common_option "$1" || die "unknown option $1 (see --help)" ;;
    esac
    shift
  done
}

# A double-quoted YAML scalar: safe for spaces, quotes, colons and backslashes.
yaml_string() {
  local value="${1//\\/\\\\}"
  value="${value//\"/\\\"}"
  printf '"%s"' "$value"
}

package_version() {
  sed -n 's/^ *version="\([^"]*\)".*/\1/p' "$here/../setup.py"
}

require_basics() {
  case "$preset" in
    cpu|gpu|multiworker|tpu) ;;
    "") die "--preset is required: cpu, gpu, multiworker or tpu" ;;
    *) die "--preset=$preset is not one of cpu, gpu, multiworker, tpu" ;;
  esac
  [[ -n "$project" ]] || die "--project (or GOOGLE_CLOUD_PROJECT) is required"
  [[ -n "$region" ]] || die "--region (or REGION) is required, e.g. us-central1"
  [[ "$bucket" == gs://* ]] || die "--bucket (or BUCKET) must be a gs:// URL, got '${bucket}'"
  bucket="${bucket%/}"
  [[ "$workers" =~ ^[0-9]+$ && "$workers" -ge 1 ]] || die "--workers must be a positive number"
  package="${package:-$bucket/packages/trainer-$(package_version).tar.gz}"
}

# Sets pools_yaml: the workerPoolSpecs entries for the preset, trainer flags as args.
worker_pool_specs() {
  local preset="$1"; shift
  local args=("$@") image machine accelerator="" count="${accelerator_count:-}" pool
  case "$preset" in
    cpu|multiworker) image="${image_uri:-$DEFAULT_CPU_IMAGE}"; machine="${machine_type:-n1-standard-8}" ;;
    gpu)
      image="${image_uri:-$DEFAULT_GPU_IMAGE}"; machine="${machine_type:-n1-standard-8}"
      accelerator="${accelerator_type:-NVIDIA_TESLA_T4}"; count="${count:-1}"
      [[ "$count" =~ ^[0-9]+$ && "$count" -ge 1 ]] || die "--accelerator_count must be 1 or more"
      args=("--strategy=gpu" "${args[@]+"${args[@]}"}") ;;
    tpu)
      image="${image_uri:-$DEFAULT_TPU_IMAGE}"; machine="${machine_type:-ct5lp-hightpu-4t}"
      args=("--strategy=tpu" "--tpu=local" "${args[@]+"${args[@]}"}") ;;
  esac
  local nl=$'\n' machine_yaml
  machine_yaml="  - machineSpec:${nl}      machineType: $(yaml_string "$machine")${nl}"
  if [[ -n "$accelerator" ]]; then
    machine_yaml+="      acceleratorType: $(yaml_string "$accelerator")${nl}      acceleratorCount: $count${nl}"
  fi
  if [[ "$preset" == tpu ]]; then
    machine_yaml+="      tpuTopology: $(yaml_string "$tpu_topology")${nl}"
  fi
  # Everything after replicaCount, the same in every pool.
  pool="    pythonPackageSpec:${nl}"
  pool+="      executorImageUri: $(yaml_string "$image")${nl}"
  pool+="      packageUris: [$(yaml_string "$package")]${nl}"
  pool+="      pythonModule: trainer.task${nl}      args:"
  if [[ "${#args[@]}" -eq 0 ]]; then
    pool+=" []"
  fi
  pool+="$nl"
  local arg
  for arg in "${args[@]+"${args[@]}"}"; do
    pool+="        - $(yaml_string "$arg")${nl}"
  done
  pools_yaml="${machine_yaml}    replicaCount: 1${nl}${pool}"
  if [[ "$preset" == multiworker ]]; then
    pools_yaml+="${machine_yaml}    replicaCount: $workers${nl}${pool}"
  fi
}

# Runs the command, or with --dry-run prints it and then the spec path as the last line.
run_or_print() {
  if [[ "$dry_run" == true ]]; then
    printf '%q ' "$@"
    printf '\n%s\n' "$spec"
    return
  fi
  command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI, or use --dry-run"
  "$@"
}
