#!/usr/bin/env bash
# The JIT caches of a GPU session (vLLM's torch.compile artifacts, Inductor's, Triton's kernels),
# carried from one session's machine to the next, so an engine starts without compiling again.
# tools/gpu/env.sh points all three at $JIT_CACHE (default /tmp/jit_cache) and restores them:
#   bash tools/gpu/jit_cache.sh restore   # .carry/jit_cache/jit_cache.tgz.part* -> $JIT_CACHE (once a machine)
#   bash tools/gpu/jit_cache.sh save      # $JIT_CACHE -> $OUT/jit_cache.tgz.part* (15 MiB parts)
# Here, after the call: mkdir -p .carry/jit_cache && cp <files_at>/jit_cache.tgz.part* .carry/jit_cache/
# and name .carry/jit_cache in the next session's carry (it has to fit beside vk4, _C and the repo).
# Where it does not fit (the 64 MiB limit of a call), restore it in a staging call instead, e.g.
# the one carrying .carry/vk2b and .carry/fa3: `bash tools/gpu/jit_cache.sh restore` there puts
# it in /tmp/jit_cache, which stays while the machine is held; later calls find it restored.
# Keys of every cache hold the versions, the GPU architecture and the configuration, so a stale
# or foreign entry is left unread (and vLLM compiles again where loading an artifact fails).
set -uo pipefail
JIT_CACHE=${JIT_CACHE:-/tmp/jit_cache}
CARRY=${JIT_CACHE_CARRY:-.carry/jit_cache}
case "${1:-}" in
restore)
    parts=("$CARRY"/jit_cache.tgz.part*)
    [ -f "${parts[0]}" ] || { echo "jit_cache: nothing carried ($CARRY)"; exit 0; }
    sum=$(cat "${parts[@]}" | cksum)
    if [ "$(cat "$JIT_CACHE/.restored" 2>/dev/null)" = "$sum" ]; then
        echo "jit_cache: restored already"; exit 0
    fi
    mkdir -p "$JIT_CACHE"
    # read the whole archive first: a missing or cut part extracts nothing, not half the files
    if cat "${parts[@]}" | tar -tz > /dev/null && cat "${parts[@]}" | tar -xz -C "$JIT_CACHE"; then
        echo "$sum" > "$JIT_CACHE/.restored"
        echo "jit_cache: restored $(du -sh "$JIT_CACHE" | cut -f1) from ${#parts[@]} part(s)"
    else
        echo "jit_cache: the carried parts do not make a whole archive (left unused)"
    fi
    ;;
save)
    [ -d "$JIT_CACHE" ] || { echo "jit_cache: no $JIT_CACHE to save"; exit 0; }
    out=${OUT:?OUT: the folder whose files come back}
    rm -f "$out"/jit_cache.tgz.part*
    tar -cz -C "$JIT_CACHE" --exclude=./.restored . | split -b 15M -d - "$out/jit_cache.tgz.part"
    echo "jit_cache: saved $(du -sh "$JIT_CACHE" | cut -f1) as $(cat "$out"/jit_cache.tgz.part* | wc -c) bytes in $(ls "$out"/jit_cache.tgz.part* | wc -l) part(s)"
    ;;
*)
    echo "usage: $0 restore|save" >&2; exit 2
    ;;
esac
