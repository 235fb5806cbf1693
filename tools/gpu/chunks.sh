# Sourced by tools/gpu/pack_*.sh (CPU machine) and stage_*.sh (GPU machine): a file too big for
# one device call travels as numbered chunk folders .carry/<prefix>1..N, one per call.

# move_into_chunks OUT PREFIX CHECKSUM PART...: part i -> OUT/PREFIX<i>/, with the CHECKSUM file
# and num_parts (N) beside it; earlier chunk folders of PREFIX are removed first.
move_into_chunks() {
  local out=$1 prefix=$2 sum=$3 i=0 p
  shift 3
  rm -rf "$out/$prefix"[0-9]*
  for p in "$@"; do
    i=$((i + 1)); mkdir -p "$out/$prefix$i"; mv "$p" "$out/$prefix$i/"
    cp "$sum" "$out/$prefix$i/"; echo "$#" > "$out/$prefix$i/num_parts"
  done
  du -sh "$out/$prefix"[0-9]*
}

# gather_chunks PREFIX STAGE: copies the chunk folders this call carried (.carry/PREFIX<i>/) into
# STAGE; prints "<parts staged so far> <parts needed>" (needed 0 until a chunk arrived).
gather_chunks() {
  local prefix=$1 stage=$2 d
  mkdir -p "$stage"
  for d in .carry/"$prefix"[0-9]*/; do [ -d "$d" ] && cp "$d"* "$stage"/; done
  echo "$(ls "$stage"/*.part* 2>/dev/null | wc -l) $(cat "$stage/num_parts" 2>/dev/null || echo 0)"
}
