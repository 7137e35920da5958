"""Write a deterministic synthetic Llama-style checkpoint (rtnq.synthetic), one tensor at a time.

    .venv/bin/python scripts/make_sample.py OUT [--preset tiny|bench-1b] [--layers N] [--shards S] [--dtype bf16]

`bench-1b` is the 1.1B-parameter shape of the conversion benchmark (2.2 GB in bf16). The same
options exist as `rtnq sample`; this script is for benchmarks that should not depend on the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses

from rtnq import synthetic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--preset", choices=["tiny", "bench-1b"], default="tiny")
    for field in dataclasses.fields(synthetic.SampleSpec):
        if field.type in ("int", int):
            ap.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--dtype", choices=sorted(synthetic.DTYPES), default=None)
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--odd-linear", action="store_true")
    args = vars(ap.parse_args())
    spec = synthetic.SampleSpec(**(synthetic.BENCH_1B if args.pop("preset") == "bench-1b" else {}))
    out = args.pop("out")
    overrides = {k: v for k, v in args.items() if v not in (None, False)}
    synthetic.write_checkpoint(out, dataclasses.replace(spec, **overrides))
    print(out)


if __name__ == "__main__":
    main()
