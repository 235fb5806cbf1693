#!/usr/bin/env bash
# CPU machine, repository root: .carry/ab_tree = medusa_vllm, benchmarks, tools and training as at
# REV (default 9dbe90a), for an A/B of the step cost against this tree in one GPU call
# (bash tools/gpu/session.sh step_cost_ab "<step_cost args>"). About 3 MB: no results, no Qwen
# heads, no extension (the call copies this tree's medusa_vllm/_C.abi3.so into it, so csrc/ must
# be unchanged since REV: checked here).
set -euo pipefail
rev=${1:-9dbe90a}
if ! git diff --quiet "$rev" HEAD -- csrc setup.py; then
  echo "csrc/ or setup.py changed since $rev: the carried extension would not match its code"; exit 1
fi
rm -rf .carry/ab_tree && mkdir -p .carry/ab_tree
git archive "$rev" medusa_vllm benchmarks tools training | tar -x -C .carry/ab_tree \
  --exclude='benchmarks/results' --exclude='medusa_vllm/data/heads/qwen*'
git rev-parse --short "$rev" > .carry/ab_tree/REV
du -sh .carry/ab_tree
