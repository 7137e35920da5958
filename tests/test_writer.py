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


def test_the_digest_computed_while_writing_is_the_files(tmp_path):
    """The journal records the writer's parts_crc32 (no read-back); --resume recomputes it from the file, and
    any changed byte (header or data) changes it. Older journals' sha256 kinds are still checked."""
    import hashlib
    import zlib

    import numpy as np

    from rtnq.checkpoint import journal

    entries = [Entry("a", "U8", (5,)), Entry("b", "I32", (3,)), Entry("c", "U8", (0,)), Entry("d", "BF16", (2, 9))]
    path = tmp_path / "x.safetensors"
    w = ShardWriter(path, entries, {"format": "pt"}, digest=True)
    d = np.arange(18, dtype=np.uint16).reshape(2, 9)
    w.write("d", d)  # a numpy array: bf16 as its uint16 bit patterns
    w.write_part("b", torch.arange(12, dtype=torch.uint8)[:5])
    w.write_part("b", torch.arange(12, dtype=torch.uint8)[5:])
    w.write_part("c", np.empty(0, dtype=np.uint8))
    w.write("a", torch.arange(5, dtype=torch.uint8))
    w.close()
    raw = path.read_bytes()
    head = 8 + int.from_bytes(raw[:8], "little")
    parts = [raw[:head], raw[head : head + 5], raw[head + 5 : head + 17], b"", raw[head + 17 :]]

    def combined(part_hex):
        return hashlib.sha256("".join(part_hex(p) for p in parts).encode()).hexdigest()

    want = combined(lambda p: f"{zlib.crc32(p):08x}")
    assert w.digest() == journal.parts_digest(path) == want
    sha_parts = combined(lambda p: hashlib.sha256(p).hexdigest())
    assert journal.parts_digest(path, "parts_digest") == sha_parts != want
    entries_ = [{"file": path.name, "size": len(raw), "parts_crc32": want},
                {"file": path.name, "size": len(raw), "parts_digest": sha_parts},  # older journals'
                {"file": path.name, "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}]
    for entry in entries_:
        assert journal.check(entry, tmp_path) is None, entry
    for at in (20, head + 3, len(raw) - 1):  # a header byte, a tensor byte, the last byte
        bad = bytearray(raw)
        bad[at] ^= 1
        path.write_bytes(bytes(bad))
        for entry in entries_:
            assert journal.check(entry, tmp_path) == "content differs", (at, entry)
    path.write_bytes(raw)
    assert all(journal.check(entry, tmp_path) is None for entry in entries_)


def test_a_numpy_array_of_the_wrong_type_is_refused(tmp_path):
    import numpy as np

    w = ShardWriter(tmp_path / "x.safetensors", [Entry("a", "BF16", (2,))])
    with pytest.raises(ValueError, match=r"expected a BF16 \[2\], got \('a', 'float16', \(2,\)\)"):
        w.write("a", np.zeros(2, dtype=np.float16))
