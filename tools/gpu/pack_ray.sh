#!/usr/bin/env bash
# CPU machine, repository root: carry chunks for Ray on the GPU machine (Python 3.12, manylinux
# x86_64, no network), for vLLM's `--distributed-executor-backend ray`.
#   bash tools/gpu/pack_ray.sh      -> .carry/ray1 .. .carry/rayN (a tar of wheels, 48 MiB chunks: a call carries the repo too)
# On the GPU machine, one call per chunk (any order, back to back, after or between vk1..vk4):
#   bash tools/gpu/stage_ray.sh     -> ray installed into /tmp/site once every chunk came
#
# Carried: the ray wheel and those of its dependencies that neither the device image ("Python
# packages already there" of the device kinds) nor the vLLM kit's vk4 wheels (jsonschema and its
# three helpers) hold; any other dependency a newer Ray pulls in is carried and named.
# RAY_VERSION (2.58.0; on a clean Python 3.12 these wheels alone ran ray.init and an actor with a
# runtime_env): vLLM 0.26's default Ray executor is RayExecutorV2 (message queues); its older
# compiled-graph executor (VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0) wants ray >= 2.43 and cupy.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/chunks.sh"
RAY_VERSION=${RAY_VERSION:-2.58.0}
OUT=${OUT_DIR:-.carry}
WORK=${WORK_DIR:-/tmp/ray-work}
# ray's dependencies already on the device: in the image, or in the vLLM kit (vk4)
IMAGE_HAS="click filelock msgpack packaging protobuf pyyaml requests certifi charset_normalizer idna
urllib3 attrs typing_extensions"
KIT_HAS="jsonschema jsonschema_specifications referencing rpds_py"

mkdir -p "$WORK/download" "$WORK/carry"
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any -d "$WORK/download" "ray==$RAY_VERSION"

rm -f "$WORK"/carry/*.whl
for whl in "$WORK"/download/*.whl; do
  name=$(basename "$whl" | cut -d- -f1 | tr 'A-Z.-' 'a-z__')
  case " $(echo $IMAGE_HAS $KIT_HAS) " in
    *" $name "*) continue ;;
  esac
  [ "$name" = ray ] || echo "carrying a dependency the device lacks: $(basename "$whl")"
  cp "$whl" "$WORK/carry/"
done
ls "$WORK"/carry/ray-"$RAY_VERSION"-cp312-*.whl >/dev/null \
  || { echo "error: no cp312 manylinux wheel of ray $RAY_VERSION was downloaded"; exit 1; }

(cd "$WORK/carry" && tar -cf ../ray.tar ./*.whl)
(cd "$WORK" && sha256sum ray.tar > ray.tar.sha256)
rm -f "$WORK"/ray.tar.part*
split -b 48M -d -a 2 "$WORK/ray.tar" "$WORK/ray.tar.part"
parts=("$WORK"/ray.tar.part*)
move_into_chunks "$OUT" ray "$WORK/ray.tar.sha256" "${parts[@]}"
echo "wheels: $(cd "$WORK/carry" && ls | tr '\n' ' ')"
echo "done: carry $OUT/ray1 .. $OUT/ray${#parts[@]}, one per call, each running: bash tools/gpu/stage_ray.sh"
