#!/bin/bash
# bash bench/memory_study/variants.sh OUT.jsonl "impl blocks [extra run.py args]" ...   one process at a time
cd "$(dirname "$0")/../.." || exit 1
out=$1; shift
for spec in "$@"; do
  set -- $spec
  impl=$1; blocks=$2; shift 2
  echo "[$(date +%T)] $impl $blocks $*" >&2
  .venv/bin/python bench/memory_study/lora_variant.py --impl "$impl" --blocks "$blocks" --steps 5 "$@" 2>>"$out.err" | grep '^RESULT ' | sed 's/^RESULT //' >> "$out"
done
