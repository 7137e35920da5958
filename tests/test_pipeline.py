"""rtnq.checkpoint.pipeline, driven by convert: the reader thread ahead of the quantizer and the writer thread behind
it. Chunk size and back-pressure never show in the output; an error in a thread surfaces with its own type and
leaves nothing behind. small_model is tests/conftest.py's multi-shard checkpoint.
"""

from __future__ import annotations

import pytest

from rtnq.commands import convert
from rtnq.commands.convert import execute
from rtnq.errors import CheckpointError


def test_small_chunks_and_few_buffers_give_the_same_files(small_model, tmp_path, monkeypatch):
    """Chunking and back-pressure are invisible in the output (tiny chunks force many of each)."""
    plan = convert.make_plan(small_model, tmp_path / "a", convert.ConvertOptions(bits=8))
    convert.run(plan)
    monkeypatch.setattr(execute, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(execute, "IN_FLIGHT", 1)
    monkeypatch.setattr(execute, "OUT_BUFFERS", 1)
    plan = convert.make_plan(small_model, tmp_path / "b", convert.ConvertOptions(bits=8))
    convert.run(plan)
    for p in sorted((tmp_path / "a").glob("*.safetensors")):
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes(), p.name


def test_a_shard_truncated_after_planning_fails_cleanly(small_model, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(small_model, src)
    plan = convert.make_plan(src, tmp_path / "out", convert.ConvertOptions())
    shard = sorted(src.glob("*.safetensors"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 4096)
    with pytest.raises(CheckpointError, match="truncated"):
        convert.run(plan)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]
