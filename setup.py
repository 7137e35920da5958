"""Build the optional C fast path: csrc/rtnq_cpu.c -> rtnq/numerics/_cpu*.so (plain C ABI, loaded with ctypes).

Everything else about the package is in pyproject.toml. The extension is optional: without a C
compiler the install still succeeds and conversion uses the pure-torch reference path (same bytes,
about ten times slower). See rtnq/numerics/fused.py and docs/PERFORMANCE.md.
"""

from setuptools import Extension, setup

# -O3 vectorizes the portable paths; -ffp-contract=off keeps every multiply and add separately
# rounded (the numerics must match torch bit for bit); never -ffast-math (subnormals, NaN, inf).
FLAGS = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-fast-math", "-fvisibility=hidden", "-Wall"]

setup(ext_modules=[Extension("rtnq.numerics._cpu", sources=["csrc/rtnq_cpu.c"], extra_compile_args=FLAGS, optional=True)])
