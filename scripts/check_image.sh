#!/usr/bin/env bash
# Checks a training image on a machine without its accelerator, as CI checks ours.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/check_image.sh IMAGE [--accelerator=cpu|gpu|tpu]

Runs in IMAGE, with no network, what CI runs in each of our images (containers/Dockerfile):
  1. `import tensorflow`, printing the TensorFlow and Keras versions;
  2. `--help`;
  3. the default smoke job with --strategy=auto, which must pick the CPU (a TPU_SYSTEM device
     without a TPU is not a TPU) and reach a validation accuracy of 0.8;
  4. the image's own accelerator strategy without the hardware (--strategy=gpu in a gpu
     image, --strategy=tpu --tpu=local in a tpu image), which must end within 90 s with one
     `error:` line and exit status 2.
Use it on your own image, built FROM ours or with other pins, before you submit jobs with it.
Run it where the accelerator is not: on a GPU or TPU host, check 4 would find the hardware.

The accelerator is read from the TensorFlow the image has (tensorflow-tpu or libtpu: tpu;
NVIDIA's CUDA wheels: gpu; else cpu) unless --accelerator is given. The runs set
TPU_SKIP_MDS_QUERY=1, without which libtpu off a TPU host asks the GCE metadata server for
minutes.

Environment: ENGINE=docker|podman (default: whichever is installed); ENGINE_RUN_ARGS adds
arguments to every `run`.
USAGE
}

die() { echo "error: $*" >&2; exit 2; }
fail() { echo "check_image: $1" >&2; [[ -z "${2:-}" ]] || tail -20 "$2" >&2; exit 1; }

image="" accelerator=""
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "$image" ]] || die "one IMAGE only (see --help)"; image="$1" ;;
  esac
  shift
done
[[ -n "$image" ]] || die "IMAGE is required (see --help)"
engine="${ENGINE:-}"
if [[ -z "$engine" ]]; then
  engine="$(command -v docker || command -v podman || true)"
  engine="${engine##*/}"
fi
[[ -n "$engine" ]] || die "no docker or podman found: install one, or set ENGINE"
read -r -a engine_args <<<"${ENGINE_RUN_ARGS:-}"
work="$(mktemp -d "${TMPDIR:-/tmp}/check-image-XXXXXX")"
name="check-image-$$"
trap '"$engine" rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

in_image() {
  "$engine" run --rm --network=none --name "$name" -e TPU_SKIP_MDS_QUERY=1 \
    "${engine_args[@]+"${engine_args[@]}"}" "$@"
}

if [[ -z "$accelerator" ]]; then
  accelerator="$(in_image --entrypoint python "$image" -c '
import importlib.metadata as metadata
names = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in metadata.distributions()}
print("tpu" if names & {"tensorflow-tpu", "libtpu"} else
      "gpu" if any(n.startswith("nvidia-cudnn") for n in names) else "cpu")')" ||
    die "cannot run python in $image: is it a trainer image?"
fi
case "$accelerator" in
  cpu) strategy=() ;;
  gpu) strategy=(--strategy=gpu) ;;
  tpu) strategy=(--strategy=tpu --tpu=local) ;;
  *) die "--accelerator=$accelerator is not one of cpu, gpu, tpu" ;;
esac

versions="$(in_image --entrypoint python "$image" -c \
  'import tensorflow as tf, keras; print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}")' \
  2>"$work/import.txt" | tail -1)" || fail "import tensorflow fails in $image" "$work/import.txt"

in_image "$image" --help >"$work/help.txt" 2>&1 || fail "--help fails in $image" "$work/help.txt"
grep -q -- "--strategy" "$work/help.txt" || fail "--help in $image lists no --strategy" "$work/help.txt"

began=$SECONDS
in_image "$image" --strategy=auto >"$work/smoke.txt" 2>&1 ||
  fail "the smoke job fails in $image" "$work/smoke.txt"
smoke_seconds=$((SECONDS - began))
grep -q "^strategy cpu (" "$work/smoke.txt" ||
  fail "--strategy=auto did not pick the CPU in $image" "$work/smoke.txt"
accuracy="$(sed -n 's/^validation accuracy \([0-9.]*\);.*/\1/p' "$work/smoke.txt")"
python3 -c "import sys; sys.exit(not float('${accuracy:-0}') >= 0.8)" ||
  fail "the smoke job in $image reached validation accuracy '${accuracy}' < 0.8" "$work/smoke.txt"
summary="$image ($accelerator): $versions; --help works; smoke job picked the CPU and reached"
summary+=" validation accuracy $accuracy in ${smoke_seconds}s"

if ((${#strategy[@]})); then
  began=$SECONDS
  status=0
  timeout --kill-after=10 90 "$engine" run --rm --network=none --name "$name" \
    -e TPU_SKIP_MDS_QUERY=1 "${engine_args[@]+"${engine_args[@]}"}" "$image" "${strategy[@]}" \
    >"$work/out.txt" 2>"$work/err.txt" || status=$?
  seconds=$((SECONDS - began))
  [[ "$status" -ne 124 && "$status" -ne 137 ]] ||
    fail "${strategy[*]} without the hardware did not end within 90 s" "$work/err.txt"
  [[ "$status" -eq 2 ]] || fail "${strategy[*]} without the hardware exited $status, not 2" "$work/err.txt"
  ! grep -q "Traceback" "$work/err.txt" || fail "${strategy[*]} printed a traceback" "$work/err.txt"
  if [[ "$(grep -c '^error: ' "$work/err.txt")" -ne 1 ]] ||
     ! grep -v '^[[:space:]]*$' "$work/err.txt" | tail -1 | grep -q '^error: '; then
    fail "${strategy[*]} did not end with one error: line" "$work/err.txt"
  fi
  summary+="; ${strategy[*]} without the hardware: exit 2 in ${seconds}s, $(grep '^error: ' "$work/err.txt")"
fi
echo "$summary"
