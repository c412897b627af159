#!/bin/bash
# Peak memory and time of one CALRec cpu-preset training step under each allocator setting (BENCHMARKS.md, issue 18
# item 5). Run it alone, from the repository root:
#
#     bash benchmarks/allocator_settings.sh [MODEL]        # CALRec by default; about 4 minutes a setting
#
# Each setting is a fresh process of benchmarks/profile_step.py (the settings are read at start-up), under
# /usr/bin/time -v for its system time, page faults and whole-process peak (the profiler's step included).
set -euo pipefail
MODEL=${1:-CALRec}
PY=${PY:-.venv/bin/python}
for setting in "THP_MEM_ALLOC_ENABLE=0" \
               "THP_MEM_ALLOC_ENABLE=0 MALLOC_MMAP_THRESHOLD_=1048576" \
               "THP_MEM_ALLOC_ENABLE=0 MALLOC_MMAP_THRESHOLD_=1048576 GLIBC_TUNABLES=glibc.malloc.hugetlb=1" \
               "THP_MEM_ALLOC_ENABLE=1 MALLOC_MMAP_THRESHOLD_=1048576" \
               "THP_MEM_ALLOC_ENABLE=1"; do
  echo "=== $setting"
  env $setting /usr/bin/time -v "$PY" benchmarks/profile_step.py --models="$MODEL" --steps=2 2>&1 |
    grep -E "seconds per|peak resident|System time|Minor|Maximum resident"
done
