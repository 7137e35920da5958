"""`rtnq bench`: time rtnq's GPU kernels against cuBLAS and the physical limits of the device.

Layout: shapes.py (what to time), report.py (pure arithmetic: bytes, floors, percentiles,
crossovers, thresholds), timing.py (CUDA-graph and wall-clock timers, ceilings), harness.py (the
device-independent sweep), backends.py (torch: weights, copies, variant calls), output.py (tables,
JSON, plot), app.py (options -> report), __main__.py (`python -m rtnq.bench`, no typer needed).
Importing this package imports no torch.
"""
