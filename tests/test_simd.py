"""The packed kernels' ISA cap (``LAYERSCOPE_SIMD``, ``layerscope_core::linalg::packed``):
each cap picks the kernel it names (when the CPU has it), and the results do not depend on
the kernel beyond FMA rounding — the AVX-512 and AVX2 kernels sum every element's products
in the same order with FMAs, so their CKA values are bitwise equal; the portable kernel
rounds each product separately (within 1e-6 here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

CODE = """
import json, numpy as np, layerscope as ls
from layerscope import _native
rng = np.random.default_rng(3)
base = rng.standard_normal((700, 16))
xs = {f"l{i}": (base @ rng.standard_normal((16, 40 + 9 * i)) + rng.standard_normal((700, 40 + 9 * i))
                + 50.0).astype(np.float32) for i in range(4)}
out = {"kernel": _native.simd_kernel(), "roofline": _native.roofline()["kernel"]}
for compute in ("float32", "float64"):
    r = ls.cka(xs, compute=compute, progress=False)
    out[compute] = r.values.tolist()
    out[compute + "_debiased"] = r.extra["debiased"].tolist()
print(json.dumps(out))
"""


def _run(cap: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LAYERSCOPE_SIMD"}
    if cap is not None:
        env["LAYERSCOPE_SIMD"] = cap
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_simd_cap_picks_the_kernel_and_keeps_the_results() -> None:
    best, avx2, portable = _run(None), _run("avx2"), _run("portable")
    assert portable["kernel"] == portable["roofline"] == "portable"
    assert avx2["kernel"] in ("avx2+fma", "portable")
    assert avx2["kernel"] == avx2["roofline"]
    assert best["kernel"] in ("avx512", "avx2+fma", "portable")
    if best["kernel"] == "avx512":
        assert avx2["kernel"] == "avx2+fma"  # every AVX-512 CPU the kernels take has AVX2
    for key in ("float32", "float64", "float32_debiased", "float64_debiased"):
        a, b, p = (np.asarray(x[key]) for x in (best, avx2, portable))
        if avx2["kernel"] != "portable":
            np.testing.assert_array_equal(a, b)  # FMA kernels: the same bits
        np.testing.assert_allclose(p, a, rtol=1e-6, atol=1e-9)
        assert np.all(np.isfinite(a)) and np.allclose(np.diag(a), 1.0)
