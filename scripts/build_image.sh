#!/usr/bin/env bash
# Builds the trainer's training image for an accelerator and pushes it to Artifact Registry.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/build_image.sh --accelerator=cpu|gpu|tpu --project=P --region=R
                              [--repository=trainer] [--tag=T] [--local] [--no-push]
                              [--base_image=IMAGE] [--dry-run]

Builds containers/Dockerfile for the accelerator and pushes it as
  R-docker.pkg.dev/P/REPOSITORY/trainer-ACCELERATOR:TAG
(default tag: the package version and the git short hash, e.g. 0.1.0-1a2b3c4, which is also
what submit_job.sh and hptune.sh use by default). The last line printed is the image URI.

By default the build runs on Cloud Build (`gcloud builds submit`): no local Docker needed.
--local builds here with docker or podman (ENGINE=docker|podman to choose; ENGINE_BUILD_ARGS
adds arguments to its build command) and pushes with it, unless --no-push.

One-time setup in the project (once per region for the repository):
  gcloud services enable artifactregistry.googleapis.com cloudbuild.googleapis.com aiplatform.googleapis.com
  gcloud artifacts repositories create trainer --repository-format=docker --location=R
With --local, let docker or podman push there: gcloud auth configure-docker R-docker.pkg.dev

Options (environment variable in brackets):
  --accelerator=A     cpu (tensorflow-cpu 2.21), gpu (tensorflow[and-cuda] 2.21) or tpu
                      (tensorflow-tpu 2.20 with libtpu, for TPU v5e)
  --project=P         Google Cloud project                       [GOOGLE_CLOUD_PROJECT]
  --region=R          Artifact Registry and Cloud Build region    [REGION]
  --repository=NAME   Artifact Registry repository (default trainer)
  --tag=T             image tag (default <version>-<git short hash>)
  --base_image=IMAGE  the Dockerfile's BASE_IMAGE (default python:3.11-slim)
  --local             build with docker or podman here instead of Cloud Build
  --no-push           with --local: build only
  --dry-run           print the commands instead of running them (a Cloud Build config
                      they name is written to the temp dir and kept)
  -h, --help          this help
USAGE
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
# shellcheck source=scripts/common.sh
source "$here/common.sh"

accelerator="" project="${GOOGLE_CLOUD_PROJECT:-}" region="${REGION:-}" repository=trainer
tag="" base_image="" local_build=false push=true dry_run=false
while (($#)); do
  case "$1" in
    --accelerator=*) accelerator="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --region=*) region="${1#*=}" ;;
    --repository=*) repository="${1#*=}" ;;
    --tag=*) tag="${1#*=}" ;;
    --base_image=*) base_image="${1#*=}" ;;
    --local) local_build=true ;;
    --no-push) push=false ;;
    --dry-run) dry_run=true ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done

case "$accelerator" in
  cpu|gpu|tpu) ;;
  "") die "--accelerator is required: cpu, gpu or tpu" ;;
  *) die "--accelerator=$accelerator is not one of cpu, gpu, tpu" ;;
esac
[[ -n "$project" ]] || die "--project (or GOOGLE_CLOUD_PROJECT) is required"
[[ -n "$region" ]] || die "--region (or REGION) is required, e.g. us-central1"
uri="$(registry_image "$region" "$project" "$repository" "$accelerator" "${tag:-$(default_tag)}")"

build_args=(--build-arg "ACCELERATOR=$accelerator")
if [[ -n "$base_image" ]]; then
  build_args+=(--build-arg "BASE_IMAGE=$base_image")
fi

if [[ "$local_build" == true ]]; then
  engine="${ENGINE:-}"
  if [[ -z "$engine" ]]; then
    engine="$(command -v docker || command -v podman || true)"
    engine="${engine##*/}"
  fi
  [[ -n "$engine" || "$dry_run" == true ]] ||
    die "--local needs docker or podman; without either, leave out --local to build on Cloud Build"
  read -r -a extra <<<"${ENGINE_BUILD_ARGS:-}"
  run_or_print "${engine:-docker}" build -f "$root/containers/Dockerfile" "${build_args[@]}" \
    "${extra[@]+"${extra[@]}"}" -t "$uri" "$root"
  if [[ "$push" == true ]]; then
    run_or_print "${engine:-docker}" push "$uri"
  fi
else
  # Cloud Build's docker step takes build arguments only from a build config: kept with
  # --dry-run, whose printed command names it, else removed once the build is submitted.
  config="$(mktemp "${TMPDIR:-/tmp}/cloudbuild-XXXXXX.yaml")"
  if [[ "$dry_run" != true ]]; then
    trap 'rm -f "$config"' EXIT
  fi
  {
    printf 'steps:\n  - name: gcr.io/cloud-builders/docker\n    args: [build, -f, containers/Dockerfile'
    for arg in "${build_args[@]}"; do printf ', %s' "$(yaml_string "$arg")"; done
    printf ', -t, %s, .]\nimages: [%s]\n' "$(yaml_string "$uri")" "$(yaml_string "$uri")"
  } >"$config"
  run_or_print gcloud builds submit "--project=$project" "--region=$region" \
    "--config=$config" "$root"
fi
echo "$uri"
