"""rtnq.checkpoint.source: scan and Reader (the source checkpoint's tensors, read or mapped a range at a time).

small_model is tests/conftest.py's multi-shard checkpoint.
"""

from __future__ import annotations

import torch

from rtnq.checkpoint.source import Reader, scan


def test_reader_map_range_matches_read_bytes(small_model):
    specs = scan(small_model)
    with Reader(small_model) as r:
        for spec in specs[:6]:
            whole = r.read_bytes(spec)
            for start, n in ((0, spec.nbytes), (3, min(100, spec.nbytes - 3)), (spec.nbytes // 2, spec.nbytes // 2)):
                assert torch.equal(r.map_range(spec, start, n), whole[start : start + n])
            buf = torch.empty(spec.nbytes // 3, dtype=torch.uint8)
            r.read_into(spec, buf, 1)
            assert torch.equal(buf, whole[1 : 1 + buf.numel()])
