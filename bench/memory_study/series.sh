#!/bin/bash
# Runs bench/memory_study/run.py once per line of a spec file ("--blocks 2 --lever x ..."), one process at a time,
# appending each RESULT line to the output file.   bash bench/memory_study/series.sh specs.txt results.jsonl
cd "$(dirname "$0")/../.." || exit 1
while IFS= read -r spec; do
  [ -z "$spec" ] && continue
  case "$spec" in \#*) continue;; esac
  echo "[$(date +%T)] $spec" >&2
  .venv/bin/python bench/memory_study/run.py $spec 2>>"$2.err" | grep '^RESULT ' | sed 's/^RESULT //' >> "$2"
done < "$1"
