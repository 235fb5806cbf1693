#!/usr/bin/env bash
# GPU machine, repository root, in every call that carries a .carry/rayN chunk (tools/gpu/pack_ray.sh):
# stages it in /tmp; once every chunk is there, rebuilds the tar of wheels, checks its sha256 and
# installs the wheels with --no-deps into /tmp/site (on PYTHONPATH through /tmp/vk_env.sh), so
# vLLM's `distributed_executor_backend="ray"` finds Ray. Idempotent; prints where it stands.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/chunks.sh"
STAGE=/tmp/ray_stage
SITE=${SITE_DIR:-/tmp/site}
PY=${PY:-python3}
mkdir -p "$SITE"
read -r have n < <(gather_chunks ray "$STAGE")
if [ -f "$SITE/.ok_ray" ]; then
  echo "ray: done ($SITE)"
elif [ "$n" -gt 0 ] && [ "$have" -eq "$n" ]; then
  cat "$STAGE"/ray.tar.part* > "$STAGE/ray.tar"
  (cd "$STAGE" && sha256sum -c ray.tar.sha256)
  rm -rf "$STAGE/wheels" && mkdir -p "$STAGE/wheels"
  tar -xf "$STAGE/ray.tar" -C "$STAGE/wheels"
  "$PY" -m pip install -q --no-deps --no-index --target "$SITE" "$STAGE"/wheels/*.whl
  PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import ray; print('ray', ray.__version__)"
  rm -rf "$STAGE/ray.tar" "$STAGE/wheels" && touch "$SITE/.ok_ray" && echo "ray: done ($SITE)"
else
  echo "ray: have $have/$n chunks"
fi
