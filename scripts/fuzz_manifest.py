"""Fuzz rtnq_manifest.json for a time budget: tests/test_fuzz_manifest.py's strategies and checks, run in batches.

    python scripts/fuzz_manifest.py --seconds 600 [--save failing_manifest.json] [--batch 50]

Converts a small synthetic checkpoint (marlin with --budget, and GPTQ) into a temporary directory, then runs
`inspect`, `inspect --json`, `verify` and `dequantize` on mutated manifests until the time is up. Prints the
count of runs by command and exit code. Exits 1, with the (shrunk) failing manifest saved to --save, when a
command prints a traceback, exits with a code outside the README's table, or fails without exactly one
`error:` line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_fuzz_manifest as fz  # noqa: E402  (after the path: the strategies live with the test)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600, help="time budget (default 600)")
    ap.add_argument("--batch", type=int, default=50, help="examples per hypothesis run (default 50)")
    ap.add_argument("--save", type=Path, default=Path("failing_manifest.json"),
                    help="where the failing manifest goes (default ./failing_manifest.json)")
    args = ap.parse_args()
    counts: Counter = Counter()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rtnq-fuzz-") as tmp:
        cases = fz.build_cases(Path(tmp))
        # Batches of fresh random examples until the budget is spent (hypothesis has no time limit of its own).
        while time.monotonic() - t0 < args.seconds:
            try:
                fz.fuzz(cases, args.batch, counts, args.save.resolve())()
            except Exception as e:  # the AssertionError of a failing command (or hypothesis' own, e.g. flaky)
                done = sum(counts.values()) // len(fz.COMMANDS)
                print(f"FAILED (after about {done} examples, shrinking included): {e}", file=sys.stderr)
                print(f"the failing manifest is in {args.save}", file=sys.stderr)
                _report(counts, time.monotonic() - t0)
                return 1
    _report(counts, time.monotonic() - t0)
    return 0


def _report(counts: Counter, seconds: float) -> None:
    print(f"{sum(counts.values())} command runs in {seconds:.0f} s (each example runs {len(fz.COMMANDS)} commands)")
    for command in dict.fromkeys(c for c, _ in sorted(counts)):
        by_code = ", ".join(f"exit {code}: {n}" for (c, code), n in sorted(counts.items()) if c == command)
        print(f"  {command}: {by_code}")


if __name__ == "__main__":
    sys.exit(main())
