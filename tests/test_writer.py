"""rtnq.checkpoint.writer: ShardWriter (a safetensors shard written tensor by tensor, in any order and in parts)."""

from __future__ import annotations

import pytest
import torch

from rtnq.checkpoint.writer import Entry, ShardWriter


def test_shard_writer_takes_tensors_in_any_order_and_in_parts(tmp_path):
    entries = [Entry("a", "U8", (5,)), Entry("b", "I32", (3,)), Entry("c", "U8", (0,)), Entry("d", "U8", (9,))]
    data = {e.name: torch.arange(e.nbytes, dtype=torch.uint8) + 7 * i for i, e in enumerate(entries)}
    w = ShardWriter(tmp_path / "in_order.safetensors", entries)
    for e in entries:
        w.write_part(e.name, data[e.name], whole=True)
    w.close()
    calls = []
    w = ShardWriter(tmp_path / "shuffled.safetensors", entries, writeback=lambda *a: calls.append(a))
    w.write_part("d", data["d"][:4])
    w.write_part("b", data["b"])
    w.write_part("d", data["d"][4:])
    w.write_part("c", data["c"])
    with pytest.raises(ValueError, match="closed before a was written"):
        ShardWriter(tmp_path / "x.safetensors", entries).close()
    w.write_part("a", data["a"])
    with pytest.raises(ValueError, match="needs 5 bytes"):
        w.write_part("a", data["a"][:1])
    w.close()
    assert (tmp_path / "in_order.safetensors").read_bytes() == (tmp_path / "shuffled.safetensors").read_bytes()
