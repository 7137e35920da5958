"""Fuzz rtnq's safetensors header scanner for a time budget (tests/test_fuzz_headers.py, run for longer).

    .venv/bin/python scripts/fuzz_headers.py [--seconds 600] [--out DIR]

Feeds hostile files (the test module's strategies) to rtnq.checkpoint.source.scan_shard in batches until the
budget is spent, and checks every one: a refusal must be an RtnqError with a one-line message, and a file rtnq
accepts must open in the safetensors library with the same tensors, dtypes and shapes. Prints the counts
(accepted, refused by error class and reason, refused by rtnq although the library opens it). On the first
failure (another exception, a hang, a disagreement) it saves the shrunk failing file under --out, prints
the error and exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_fuzz_headers as fuzzing  # the strategies and the property live with the test

HANG_SECONDS = 10  # scanning one small file takes milliseconds; longer is a hang (a FIFO-style block, a loop)
BATCH = 500  # examples per hypothesis run; each run starts from a fresh random seed

# The reason of a refusal, from its message: the first phrase that occurs in it.
REASONS = (
    "appears twice", "lone UTF-16 surrogate", "nested more than", "digits", "is not a JSON value", "overflows a double",
    "not UTF-8", "not valid JSON", "not a JSON object", "header claims", "truncated safetensors file",
    "__metadata__", "not an object", "has no", "is not a string", "which rtnq cannot read",
    "is not a list of integers", "is not a pair of integers", "64-bit count", "do not fit", "the file is truncated",
    "overlap", "refuses gaps", "after the last tensor",
)


class Hang(Exception):
    """A scan that ran past HANG_SECONDS."""


def _on_alarm(signum, frame):
    raise Hang(f"scan_shard ran for more than {HANG_SECONDS} s")


def reason(label: str) -> str:
    kind, _, message = label.partition(": ")
    return f"{kind}: " + next((r for r in REASONS if r in message), "other")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600, help="time budget (default 600)")
    parser.add_argument("--out", type=Path, default=Path("fuzz-failures"), help="where a failing file is saved")
    args = parser.parse_args()

    reasons: Counter = Counter()
    stricter = Counter()  # refused by rtnq, opened by the library: allowed, but worth seeing

    def checker(raw: bytes, path: Path) -> str:
        signal.alarm(HANG_SECONDS)
        try:
            label = fuzzing.check(raw, path)
        finally:
            signal.alarm(0)
        if label != "accepted":
            reasons[reason(label)] += 1
            with contextlib.suppress(Exception):  # refused by both: the expected case
                fuzzing.library_view(path)
                stricter[reason(label)] += 1
        return label

    signal.signal(signal.SIGALRM, _on_alarm)
    outcomes: Counter = Counter()
    start = time.monotonic()
    batches = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        while time.monotonic() - start < args.seconds:
            try:
                fuzzing.fuzz(path, BATCH, outcomes, checker)
            except BaseException as e:  # noqa: BLE001 (any failure of the property; Ctrl-C stops and reports)
                if isinstance(e, KeyboardInterrupt):
                    break
                args.out.mkdir(parents=True, exist_ok=True)
                saved = args.out / f"failure-{time.strftime('%Y%m%d-%H%M%S')}.safetensors"
                if path.exists():
                    shutil.copyfile(path, saved)
                print(f"FAILURE after {sum(outcomes.values())} files: {type(e).__name__}: {e}", file=sys.stderr)
                print(f"the failing file (shrunk): {saved}", file=sys.stderr)
                return 1
            batches += 1

    total = sum(outcomes.values())
    print(f"{total} files in {time.monotonic() - start:.0f} s ({batches} batches of {BATCH}):")
    for label, n in outcomes.most_common():
        print(f"  {label:<20} {n}")
    print("refusals by reason:")
    for label, n in reasons.most_common():
        print(f"  {label:<50} {n}" + (f"  ({stricter[label]} of them opened by safetensors)" if stricter[label] else ""))
    print("no typed-error or differential failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
