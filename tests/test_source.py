"""rtnq.checkpoint.source: scan and Reader (the source checkpoint's tensors, read or mapped a range at a time).

small_model is tests/conftest.py's multi-shard checkpoint.
"""

from __future__ import annotations

import json
import os
import struct
import threading

import pytest
import torch
from safetensors import safe_open

from cliutil import leftovers, run
from rtnq import synthetic
from rtnq.checkpoint import layout
from rtnq.checkpoint.source import Reader, scan, scan_shard
from rtnq.errors import CheckpointError, RtnqError
from rtnq.runtime import dispatch


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


# -- hostile headers and JSON files: one typed error, never a traceback, a hang, or a file no loader opens --


ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root reads files whatever their permissions


def _shard(path, header: str | bytes, data: bytes = b""):
    """A safetensors file with this exact header text (written as given: raw escapes, repeated keys)."""
    raw = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _t(dtype='"F16"', shape="[2]", offsets="[0, 4]") -> str:
    return f'{{"dtype": {dtype}, "shape": {shape}, "data_offsets": {offsets}}}'


def _library_refuses(path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            list(f.keys())
    except Exception:  # noqa: BLE001 (SafetensorError, whatever the binding names it)
        return True
    return False


# Headers the safetensors library refuses (asserted, so the rule is its, not ours), each with what rtnq says.
LIBRARY_REFUSES = {
    "lone surrogate name": ('{"\\ud800": ' + _t() + "}", 4, "lone UTF-16 surrogate"),
    "true in a shape": ('{"w": ' + _t(shape="[true]", offsets="[0, 2]") + "}", 2, "shape [True] is not a list of integers"),
    "false as an offset": ('{"w": ' + _t(offsets="[false, 4]") + "}", 4, "data_offsets [False, 4]"),
    "-0 in a shape": ('{"w": ' + _t(shape="[-0]", offsets="[0, 0]") + "}", 0, "shape [-0]"),
    "1.0 in a shape": ('{"w": ' + _t(shape="[1.0]", offsets="[0, 2]") + "}", 2, "shape [1.0]"),
    "dimension past 64 bits": ('{"w": ' + _t(shape=f"[0, {2**64}]", offsets="[0, 0]") + "}", 0, "not a list of integers"),
    "element count overflows": ('{"w": ' + _t(shape=f"[{2**63}, {2**63}, 0]", offsets="[0, 0]") + "}", 0, "64-bit count"),
    "three offsets": ('{"w": ' + _t(offsets="[0, 4, 4]") + "}", 4, "not a pair of integers"),
    "metadata not strings": ('{"__metadata__": {"format": 1}, "w": ' + _t() + "}", 4, "__metadata__"),
    "metadata a list": ('{"__metadata__": [], "w": ' + _t() + "}", 4, "__metadata__"),
    "a gap before the first tensor": ('{"w": ' + _t(offsets="[2, 6]") + "}", 6, "2 byte(s) before tensor w"),
    "a gap between tensors": ('{"a": ' + _t(shape="[1]", offsets="[0, 2]") + ', "b": '
                              + _t(shape="[1]", offsets="[4, 6]") + "}", 6, "refuses gaps"),
    "bytes after the last tensor": ('{"w": ' + _t() + "}", 5, "1 byte(s) after the last tensor"),
    "a duplicated field": ('{"w": {"dtype": "F16", "shape": [2], "shape": [2], "data_offsets": [0, 4]}}', 4,
                           "appears twice"),
    "a header that is a list": ("[]", 0, "not a JSON object"),
    "an entry that is null": ('{"w": null}', 0, "not an object"),
    "1,000 levels of nesting": ('{"w": ' + "[" * 1000 + "]" * 1000 + "}", 0, "nested more than"),
    "NaN": ('{"w": ' + _t(shape="[NaN]") + "}", 4, "NaN"),
}


@pytest.mark.parametrize("case", LIBRARY_REFUSES, ids=list(LIBRARY_REFUSES))
def test_headers_safetensors_refuses_are_refused_by_name(tmp_path, case):
    header, data_size, needle = LIBRARY_REFUSES[case]
    path = _shard(tmp_path / "model.safetensors", header, bytes(data_size))
    assert _library_refuses(path)
    with pytest.raises(CheckpointError) as e:
        scan_shard(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith("model.safetensors: ") and needle in message, message


# rtnq refuses more than the library does where a reader cannot know which value the writer meant.
def test_a_duplicated_tensor_name_is_refused_though_the_library_keeps_the_last(tmp_path):
    path = _shard(tmp_path / "model.safetensors", '{"w": ' + _t(shape="[1]", offsets="[0, 2]") + ', "w": ' + _t() + "}",
                  bytes(4))
    with pytest.raises(CheckpointError, match="the key 'w' appears twice"):
        scan_shard(path)


@pytest.mark.parametrize("entry, needle", [
    (_t(dtype='["F16"]'), "dtype ['F16'] is not a string"),
    (_t(dtype="{}"), "dtype {} is not a string"),
    (_t(dtype="5"), "dtype 5 is not a string"),
    (_t(dtype="null"), "dtype None is not a string"),
    (_t(shape='"2"'), "shape '2' is not a list"),
    (_t(shape='{"0": 2}'), "shape {'0': 2} is not a list"),
    (_t(shape="2"), "shape 2 is not a list"),
    (_t(offsets='"0,4"'), "data_offsets '0,4' is not a pair"),
    (_t(offsets="null"), "data_offsets None is not a pair"),
    (_t(offsets='{"a": 0}'), "is not a pair"),
    ('["F16", [2], [0, 4]]', "its header entry is ['F16', [2], [0, 4]], not an object"),
    ('{"dtype": "F16", "shape": [2]}', "has no 'data_offsets'"),
])
def test_wrongly_typed_fields_are_typed_errors(tmp_path, entry, needle):
    path = _shard(tmp_path / "model.safetensors", '{"w": ' + entry + "}", bytes(4))
    with pytest.raises(CheckpointError, match="^model.safetensors: tensor w") as e:
        scan_shard(path)
    assert needle in str(e.value), e.value


def test_zero_size_tensors_are_accepted_anywhere_between_others(tmp_path):
    header = ('{"a": ' + _t(shape="[1]", offsets="[0, 2]") + ', "empty": ' + _t(shape="[0]", offsets="[2, 2]")
              + ', "empty2": ' + _t(dtype='"F32"', shape="[3, 0]", offsets="[4, 4]") + ', "b": '
              + _t(shape="[1]", offsets="[2, 4]") + ', "last": ' + _t(shape="[0, 7]", offsets="[4, 4]") + "}")
    path = _shard(tmp_path / "model.safetensors", header, bytes(4))
    specs = {s.name: s.shape for s in scan_shard(path)}
    assert specs == {"a": (1,), "empty": (0,), "empty2": (3, 0), "b": (1,), "last": (0, 7)}
    with safe_open(str(path), "pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == specs
    assert scan_shard(_shard(tmp_path / "none.safetensors", "{}")) == []  # no tensor at all: valid too


def test_printable_messages_for_unprintable_names(tmp_path):
    path = _shard(tmp_path / "model.safetensors", '{"a\\nb": ' + _t(dtype='"C64\\n"') + "}", bytes(4))
    with pytest.raises(CheckpointError, match=r"tensor a\\nb has dtype C64\\n, which rtnq cannot read"):
        scan_shard(path)


def _scan_in_thread(fn, *args):
    """fn(*args) with a deadline: a FIFO opened for reading blocks forever, which must fail the test, not hang it."""
    result = {}

    def target():
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), f"{fn.__name__} blocked on a FIFO"
    return result


def test_a_fifo_or_directory_in_place_of_a_shard_is_refused_without_opening_it(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    os.mkfifo(single / "model.safetensors")
    error = _scan_in_thread(scan, single)["error"]
    assert isinstance(error, CheckpointError) and "model.safetensors: the model file is a FIFO" in str(error), error
    error = _scan_in_thread(scan_shard, single / "model.safetensors")["error"]  # scan_shard alone refuses it too
    assert isinstance(error, CheckpointError) and "a FIFO, not a safetensors file" in str(error), error

    src = synthetic.write_checkpoint(tmp_path / "sharded", synthetic.SampleSpec(shards=2))
    listed = sorted(src.glob("model-*.safetensors"))[1]
    listed.unlink()
    os.mkfifo(listed)
    error = _scan_in_thread(scan, src)["error"]
    assert isinstance(error, CheckpointError) and f"{listed.name}: the shard model.safetensors.index.json lists is a FIFO" \
        in str(error), error
    listed.unlink()
    listed.mkdir()
    with pytest.raises(CheckpointError, match="is a directory, not a regular file"):
        scan(src)
    listed.rmdir()
    index = src / layout.INDEX_NAME
    index.unlink()
    os.mkfifo(index)
    error = _scan_in_thread(scan, src)["error"]
    assert isinstance(error, CheckpointError) and "model.safetensors.index.json: not a regular file" in str(error), error


@pytest.mark.skipif(ROOT, reason="root reads files whatever their permissions")
def test_an_unreadable_shard_or_directory_says_why(tmp_path):
    src = synthetic.write_checkpoint(tmp_path / "src", synthetic.SampleSpec(shards=1))
    shard = src / "model.safetensors"
    shard.chmod(0)
    try:
        with pytest.raises(CheckpointError, match=r"model.safetensors: cannot read \(Permission denied\)"):
            scan(src)
    finally:
        shard.chmod(0o644)
    src.chmod(0)
    try:
        with pytest.raises(CheckpointError, match=r"cannot read the directory \(Permission denied\)"):
            scan(src)
    finally:
        src.chmod(0o755)


def test_an_os_error_opening_a_shard_is_one_line_with_the_reason(tmp_path, monkeypatch):
    """The permission case above, as root can run it: whatever the OS refuses, its reason is the message."""
    src = synthetic.write_checkpoint(tmp_path / "src", synthetic.SampleSpec(shards=1))

    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot read \(Permission denied\)$"):
        scan(src)
    monkeypatch.undo()
    monkeypatch.setattr(os, "listdir", refuse)
    with pytest.raises(CheckpointError, match=r"src: cannot read the directory \(Permission denied\)$"):
        scan(src)


HOSTILE_JSON = {
    "1,000 levels": "[" * 1000 + "]" * 1000,
    "a 5,000-digit integer": '{"num_key_value_heads": ' + "9" * 5000 + "}",
    "a lone surrogate": '{"model_type": "\\ud800"}',
    "a repeated key": '{"model_type": "llama", "model_type": "gemma"}',
    "not UTF-8": b"\xff\xfe{}",
}


@pytest.mark.parametrize("case", HOSTILE_JSON, ids=list(HOSTILE_JSON))
def test_json_files_json_loads_chokes_on_are_typed_errors(tmp_path, case):
    text = HOSTILE_JSON[case]
    write = (lambda p: p.write_bytes(text)) if isinstance(text, bytes) else (lambda p: p.write_text(text))
    config = tmp_path / "config.json"
    write(config)
    with pytest.raises(CheckpointError, match="^" + str(config)):
        layout.read_json_object(config)
    assert layout.model_type(tmp_path) == "" and layout.kv_heads(tmp_path) is None  # best effort: no traceback
    index = tmp_path / layout.INDEX_NAME
    write(index)
    with pytest.raises(CheckpointError, match="^" + str(index)):
        layout.index_map(tmp_path)
    file = tmp_path / "dispatch.json"
    write(file)
    with pytest.raises(RtnqError, match="not a readable dispatch file.*re-run `rtnq bench`"):
        dispatch.load_thresholds("G", 4, "bf16", path=file)


@pytest.mark.parametrize("config", [
    '{"text_config": 3, "model_type": "llama", "num_key_value_heads": 2}',
    '{"text_config": {"model_type": 7, "num_key_value_heads": true}}',
    '[1, 2]', '"llama"', "null",
])
def test_config_oddities_are_best_effort(tmp_path, config):
    (tmp_path / "config.json").write_text(config)
    mt, heads = layout.model_type(tmp_path), layout.kv_heads(tmp_path)
    assert (mt, heads) == (("llama", 2) if config.startswith('{"text_config": 3') else ("", None))


def test_config_json_as_a_fifo_does_not_hang_the_best_effort_readers(tmp_path):
    os.mkfifo(tmp_path / "config.json")
    assert _scan_in_thread(layout.model_type, tmp_path)["value"] == ""
    assert _scan_in_thread(layout.kv_heads, tmp_path)["value"] is None


# -- through the CLI: exit 4, one `error:` line naming the file, no output, no traceback


def _convert_refuses(src, tmp_path, *needles):
    out = tmp_path / "out"
    r = run("convert", src, out)
    lines = [line for line in r.err.strip().splitlines() if line.strip()]
    assert r.code == 4 and len(lines) == 1 and lines[0].startswith("error: "), r.err
    assert "Traceback" not in r.err and not out.exists() and leftovers(tmp_path) == []
    for needle in needles:
        assert needle in lines[0], lines[0]


def _edit_header(path, edit, raw: dict[str, str]):
    """Rewrite a shard's header: `edit` changes the dict, then each "placeholder" string is replaced by raw JSON
    text (a lone-surrogate escape, `true`), which no Python value serializes to."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    text = json.dumps(header)
    for placeholder, token in raw.items():
        text = text.replace(json.dumps(placeholder), token)
    _shard(path, text, data[8 + n :])


@pytest.fixture
def single(tmp_path):
    src = synthetic.write_checkpoint(tmp_path / "src", synthetic.SampleSpec(shards=1))
    return src, src / "model.safetensors", "model.layers.0.mlp.up_proj.weight"


def test_cli_lone_surrogate_tensor_name(single, tmp_path):
    src, shard, name = single
    _edit_header(shard, lambda h: h.update({"SURROGATE": h.pop(name)}), {"SURROGATE": '"\\ud800x"'})
    _convert_refuses(src, tmp_path, "model.safetensors", "lone UTF-16 surrogate")


def test_cli_true_in_a_shape(single, tmp_path):
    src, shard, name = single
    _edit_header(shard, lambda h: h[name]["shape"].insert(0, "TRUE"), {"TRUE": "true"})
    _convert_refuses(src, tmp_path, "model.safetensors", f"tensor {name}", "shape [True, ")


def test_cli_bytes_after_the_last_tensor(single, tmp_path):
    src, shard, _ = single
    with open(shard, "ab") as f:
        f.write(b"\0" * 8)
    _convert_refuses(src, tmp_path, "model.safetensors", "8 byte(s) after the last tensor")


def test_cli_a_fifo_named_model_safetensors(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "llama"}')
    os.mkfifo(src / "model.safetensors")
    result = _scan_in_thread(_convert_refuses, src, tmp_path, "model.safetensors", "is a FIFO")
    if "error" in result:
        raise result["error"]
