"""TEST ONLY (tests/test_resume.py): run `rtnq ARGS` and SIGKILL the process at a chosen point, as a power loss
or the OOM killer would, so no handler, `finally` or atomic_dir cleanup runs. The patches live here, so the
production code carries no test hooks.

    python tests/kill_convert.py journaled N  convert SRC OUT ...   # right after the journal records its N-th shard
    python tests/kill_convert.py written S K  convert SRC OUT ...    # after K tensor writes into shard file S (1-based)
    python tests/kill_convert.py manifest     convert SRC OUT ...   # every shard journaled, before the manifest
"""

from __future__ import annotations

import os
import signal
import sys
import time

from rtnq.checkpoint import journal, writer
from rtnq.commands.convert import execute


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    point, args = sys.argv[1], sys.argv[2:]
    state = {"records": 0, "writes": 0}
    real_record = journal.Journal.record

    def record(self, fname, notes, digest=None):
        real_record(self, fname, notes, digest)
        state["records"] += 1
        if point == "journaled" and state["records"] == int(args[0]):
            die()

    journal.Journal.record = record
    if point == "written":
        shard, k = int(args[0]), int(args[1])
        real_part = writer.ShardWriter.write_part

        def write_part(self, name, data, *, whole=False):
            real_part(self, name, data, whole=whole)
            if self.path.name.startswith(f"model-{shard:05d}-"):
                state["writes"] += 1
                if state["writes"] == k:
                    self._f.flush()  # the partial shard reaches the file, as it would have eventually
                    die()

        writer.ShardWriter.write_part = write_part
    elif point == "manifest":
        def build_manifest(plan, errors):
            deadline = time.monotonic() + 30  # the last fsync and record run on the fsync thread
            while time.monotonic() < deadline:
                if state["records"] == len(plan.shards):  # counted once each record is saved
                    die()
                time.sleep(0.01)
            raise RuntimeError("the journal never recorded every shard")

        execute.build_manifest = build_manifest
    skip = {"journaled": 1, "written": 2, "manifest": 0}[point]
    sys.argv = ["rtnq", *args[skip:]]
    from rtnq.cli import main as rtnq_main

    rtnq_main()


if __name__ == "__main__":
    main()
