# Shared by submit_job.sh and hptune.sh: option parsing and checks, and the worker pool YAML.
# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154  # variables shared with the scripts that source this


die() { echo "error: $*" >&2; exit 2; }

# The options submit_job.sh and hptune.sh share, with their defaults.
common_defaults() {
  preset="${PRESET:-}" project="${GOOGLE_CLOUD_PROJECT:-}" region="${REGION:-}" bucket="${BUCKET:-}"
  display_name="" package="" image_uri="${IMAGE_URI:-}" machine_type="${MACHINE_TYPE:-}"
  accelerator_type="${ACCELERATOR_TYPE:-}" accelerator_count="${ACCELERATOR_COUNT:-}"
  executor_image_uri="" repository=trainer tag=""
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
    --executor_image_uri=*) executor_image_uri="${1#*=}" ;;
    --repository=*) repository="${1#*=}" ;;
    --tag=*) tag="${1#*=}" ;;
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

# The tag build_image.sh gives an image by default: <version>-<git short hash>, so that the
# scripts that submit jobs find the image built from this checkout.
default_tag() {
  local commit
  commit="$(git -C "$here/.." rev-parse --short HEAD 2>/dev/null || echo nogit)"
  echo "$(package_version)-$commit"
}

# R-docker.pkg.dev/P/REPOSITORY/trainer-ACCELERATOR:TAG
registry_image() {
  echo "$1-docker.pkg.dev/$2/$3/trainer-$4:$5"
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
  if [[ -n "$executor_image_uri" ]]; then
    echo "warning: --executor_image_uri runs the trainer package in a prebuilt image; Google's" \
      "prebuilt TensorFlow training images stop at TF 2.17 (and have none for TPU v5e):" \
      "prefer our own, scripts/build_image.sh" >&2
  fi
}

# Checks the trainer flags as the job will parse them, before anything is submitted
# (trainer.preflight, without TensorFlow); the arguments are trainer.preflight's.
check_trainer_flags() {
  local python="${PYTHON:-python3}"
  export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"
  "$python" -c "import absl.flags, yaml, google.cloud.storage" 2>/dev/null ||
    die "checking the trainer flags before a job is submitted needs the trainer's" \
      "dependencies: pip install -e . in this checkout, or set PYTHON to a Python that has them"
  "$python" -m trainer.preflight "$@" || exit 2
}

# Sets pools_yaml, the workerPoolSpecs entries for the preset, and pool_args, the trainer flags
# every pool runs with.
worker_pool_specs() {
  local preset="$1"; shift
  local args=("$@") image machine accelerator="" count="${accelerator_count:-}" pool built=cpu
  case "$preset" in
    cpu|multiworker) machine="${machine_type:-n1-standard-8}" ;;
    gpu)
      built=gpu machine="${machine_type:-n1-standard-8}"
      accelerator="${accelerator_type:-NVIDIA_TESLA_T4}"; count="${count:-1}"
      [[ "$count" =~ ^[0-9]+$ && "$count" -ge 1 ]] || die "--accelerator_count must be 1 or more"
      args=("--strategy=gpu" "${args[@]+"${args[@]}"}") ;;
    tpu)
      built=tpu machine="${machine_type:-ct5lp-hightpu-4t}"
      [[ "$machine" != ct6e-* ]] || die "--machine_type=$machine is TPU v6e, where Vertex AI" \
        "does not support TensorFlow training: use TPU v5e (ct5lp-hightpu-1t, -4t or -8t)"
      args=("--strategy=tpu" "--tpu=local" "${args[@]+"${args[@]}"}") ;;
  esac
  pool_args=("${args[@]+"${args[@]}"}")
  # Our image for the accelerator (scripts/build_image.sh, same default tag) unless named.
  image="${image_uri:-$(registry_image "$region" "$project" "$repository" "$built" "${tag:-$(default_tag)}")}"
  local nl=$'\n' machine_yaml
  machine_yaml="  - machineSpec:${nl}      machineType: $(yaml_string "$machine")${nl}"
  if [[ -n "$accelerator" ]]; then
    machine_yaml+="      acceleratorType: $(yaml_string "$accelerator")${nl}      acceleratorCount: $count${nl}"
  fi
  if [[ "$preset" == tpu ]]; then
    machine_yaml+="      tpuTopology: $(yaml_string "$tpu_topology")${nl}"
  fi
  # Everything after replicaCount, the same in every pool: the image runs trainer.task.
  if [[ -n "$executor_image_uri" ]]; then
    pool="    pythonPackageSpec:${nl}"
    pool+="      executorImageUri: $(yaml_string "$executor_image_uri")${nl}"
    pool+="      packageUris: [$(yaml_string "$package")]${nl}"
    pool+="      pythonModule: trainer.task${nl}      args:"
  else
    pool="    containerSpec:${nl}"
    pool+="      imageUri: $(yaml_string "$image")${nl}      args:"
  fi
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

# Runs the command, or with --dry-run prints it (and then the spec path, if there is one).
run_or_print() {
  if [[ "$dry_run" == true ]]; then
    printf '%q ' "$@"
    printf '\n'
    if [[ -n "${spec:-}" ]]; then
      printf '%s\n' "$spec"
    fi
    return
  fi
  command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI, or use --dry-run"
  "$@"
}
