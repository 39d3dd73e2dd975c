#!/usr/bin/env bash
# Builds the trainer's source distribution for Vertex AI's Python-package route, and uploads it.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/build_package.sh [--bucket=gs://B] [--dist=DIR] [--uploader=gcloud|python]

Builds dist/trainer-<version>.tar.gz (the package Vertex AI installs into its prebuilt
TensorFlow container). With --bucket, copies it to gs://B/packages/, where submit_job.sh and
hptune.sh look for it: with `gcloud storage cp` when gcloud is installed, else (or with
--uploader=python) with scripts/upload.py (google-cloud-storage). The last line of output is
the package's path.
USAGE
}

bucket="${BUCKET:-}" dist="" uploader=""
while (($#)); do
  case "$1" in
    --bucket=*) bucket="${1#*=}" ;;
    --dist=*) dist="${1#*=}" ;;
    --uploader=*) uploader="${1#*=}" ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dist="${dist:-$root/dist}"
python="${PYTHON:-python3}"
(cd "$root" && "$python" setup.py -q sdist --dist-dir "$dist" >/dev/null)
version="$(cd "$root" && "$python" setup.py --version)"
package="$dist/trainer-$version.tar.gz"
[[ -f "$package" ]] || { echo "error: $package was not built" >&2; exit 1; }

if [[ -n "$bucket" ]]; then
  [[ "$bucket" == gs://* ]] || { echo "error: --bucket must be a gs:// URL" >&2; exit 2; }
  target="${bucket%/}/packages/$(basename "$package")"
  if [[ -z "$uploader" ]]; then
    uploader=python
    if command -v gcloud >/dev/null; then uploader=gcloud; fi
  fi
  if [[ "$uploader" == gcloud ]]; then
    gcloud storage cp "$package" "$target"
  else
    "$python" "$root/scripts/upload.py" "$package" "$target"
  fi
  package="$target"
fi
echo "$package"
