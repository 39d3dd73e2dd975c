#!/usr/bin/env bash
# Runs the trainer here as a Vertex AI job would, for a quick check before submitting.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/local_run.sh [--image_uri=URI] [-- trainer flags...]

With --image_uri and gcloud installed: `gcloud ai custom-jobs local-run` in that container.
Otherwise: `python -m trainer.task` with the same flags in this environment.
USAGE
}

image_uri=""
while (($#)); do
  case "$1" in
    --image_uri=*) image_uri="${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "$image_uri" ]] && command -v gcloud >/dev/null; then
  exec gcloud ai custom-jobs local-run "--executor-image-uri=$image_uri" \
    "--local-package-path=$root" --python-module=trainer.task -- "$@"
fi
cd "$root"
exec "${PYTHON:-python3}" -m trainer.task "$@"
