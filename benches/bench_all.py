"""Run every side-by-side benchmark (``make bench``). Pass ``--quick`` for a short smoke run.

Each script prints its own ratios (against numpy/torch written well, the peer libraries when
installed, and the machine's GEMM peak measured in the same run) and its peak memory.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPTS = [
    "bench_store.py", "bench_cka.py", "bench_align.py", "bench_id.py", "bench_capture.py",
    "bench_scale.py", "bench_convert.py", "bench_batch.py", "bench_ray.py", "bench_gpu.py",
    "bench_calibrated.py", "bench_growth.py",
]


def main() -> int:
    here = Path(__file__).resolve().parent
    extra = sys.argv[1:]
    failed = []
    for name in SCRIPTS:
        path = here / name
        if not path.exists():
            print(f"== {name}: missing, skipped")
            continue
        print(f"== {name} {' '.join(extra)}", flush=True)
        rc = subprocess.call([sys.executable, str(path), *extra])
        if rc != 0:
            failed.append(name)
    if failed:
        print("failed:", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
