"""`rtnq bench`: time rtnq's GPU kernels against cuBLAS and the physical limits of the device.

Layout:
  options.py   the one option table (Options), from which `rtnq bench` and `python -m rtnq.bench` are built
  app.py       options -> report: validation, the run, threshold saving
  __main__.py  `python -m rtnq.bench` (argparse, no typer or rich needed)
  shapes.py    what to time: model shape tables, checkpoint shape groups
  report.py    pure arithmetic: bytes, floors, percentiles, crossovers, thresholds
  timing.py    CUDA-graph and wall-clock timers, the measured ceilings
  harness.py   the device-independent sweep and stack timing
  backends.py  the torch backend of the sweep: weight copies and one call per variant
  device.py    CUDA availability, the runtime's facts (RuntimeInfo), seeded tensors on the device
  weights.py   per shape: MarlinWeight per configuration, codes, dequantized weight; checkpoint reads
  peers.py     PyTorch's int4 (tinygemm) and int8 kernels as peers
  stack.py     the linear-stack figure
  output.py    tables, JSON, plot

Importing this package, options.py or app.py imports no torch; the rest is imported inside app.run.
"""
