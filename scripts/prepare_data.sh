#!/usr/bin/env bash
# Converts an image folder into TFRecord shards in a bucket, for training at scale.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/prepare_data.sh --images=DIR --bucket=gs://B [--name=NAME] [-- prepare flags...]

Runs `python -m trainer.prepare --images=DIR --output=gs://B/datasets/NAME` (NAME defaults to
the folder's name); flags after -- go to trainer.prepare, e.g. -- --max_side=256.
The last line of output is the dataset's gs:// path, to pass as --data.
USAGE
}

images="" bucket="${BUCKET:-}" name="" prepare_args=()
while (($#)); do
  case "$1" in
    --images=*) images="${1#*=}" ;;
    --bucket=*) bucket="${1#*=}" ;;
    --name=*) name="${1#*=}" ;;
    -h|--help) usage; exit 0 ;;
    --) shift; prepare_args=("$@"); break ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$images" ]] || { echo "error: --images is required" >&2; exit 2; }
[[ "$bucket" == gs://* ]] || { echo "error: --bucket must be a gs:// URL" >&2; exit 2; }
name="${name:-$(basename "${images%/}")}"
output="${bucket%/}/datasets/$name"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
(cd "$root" && "${PYTHON:-python3}" -m trainer.prepare "--images=$images" "--output=$output" \
  "${prepare_args[@]+"${prepare_args[@]}"}")
echo "$output"
