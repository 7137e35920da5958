"""Facts about a checkpoint directory, in one place: which files hold the weights, which are copied.

    model.safetensors                 a single-file checkpoint (SINGLE_NAME)
    model-0000i-of-0000N.safetensors  shards, listed by model.safetensors.index.json (INDEX_NAME)
    config.json                       rewritten by convert and dequantize, never copied (CONFIG_NAME)
    rtnq_manifest.json                rtnq's precision manifest (MANIFEST_NAME; rtnq.checkpoint.manifest)
    quantize_config.json              GPTQ's config for AutoGPTQ-era loaders (GPTQ_CONFIG_NAME)
    tokenizer*, generation_config...  small files, copied unchanged (small_files)

Pickle weights (.bin, .pt, ...) are never copied and never unpickled.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from rtnq.checkpoint import jsonfile
from rtnq.errors import CheckpointError, UsageError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MANIFEST_NAME = "rtnq_manifest.json"
GPTQ_CONFIG_NAME = "quantize_config.json"
# Files that are weights in some format: never copied (and never unpickled).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_COPY_BYTES = 256 * 1024 * 1024  # tokenizer and config files are small; anything bigger is a weight
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def shard_name(i: int, n: int) -> str:
    """The HF name of shard i (0-based) of n; a single shard is model.safetensors."""
    return SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def resolve(src: str | Path) -> Path:
    """A local model directory; a hub id is recognised and refused with the download command (convert reads
    hub ids itself, through rtnq.commands.convert.hub_source, before it calls this)."""
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists():
        raise UsageError(f"{src} is a file; pass the model directory that contains it")
    if HUB_ID.match(str(src)):
        raise UsageError(
            f"{src}: no such directory; it looks like a Hugging Face hub id, which `rtnq convert` reads directly "
            f"but this command needs on disk: `hf download {src} --local-dir DIR`, then pass DIR"
        )
    raise UsageError(f"{src}: no such directory")


def index_map(model_dir: Path) -> dict[str, str] | None:
    """The index's weight_map (tensor -> shard file), or None when the directory has no index."""
    index = model_dir / INDEX_NAME
    if not os.path.lexists(index):  # present but a FIFO, a directory or a broken link: refused by jsonfile.read
        return None
    data = jsonfile.read(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)")
    if not weight_map:
        raise CheckpointError(f"{index}: its weight_map lists no tensor; the index is broken, fix or remove it")
    return weight_map


def _regular_file(path: Path, what: str) -> None:
    """Refuse anything but a regular file before anything opens it: opening a FIFO blocks forever, and a
    directory or a device is not a shard. `what` says where the name came from."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a special file"
        raise CheckpointError(f"{path}: {what} is {kind}, not a regular file; replace it with the real shard")


_SHARD_OF = re.compile(r"(.+)-(\d+)-of-(\d+)\.safetensors")


def _one_numbered_set(names: list[str]) -> bool:
    """All of `names` are the shards prefix-i-of-N of one complete numbered set."""
    matches = [_SHARD_OF.fullmatch(n) for n in names]
    if not all(matches) or len({(m.group(1), m.group(3)) for m in matches}) != 1:
        return False
    return len(names) == int(matches[0].group(3))


def shard_files(model_dir: Path) -> list[str]:
    """The shard file names of a model directory, from its index or its single file."""
    try:  # an unreadable directory would otherwise look empty ("no .safetensors files found")
        names = set(os.listdir(model_dir))
    except OSError as e:
        raise CheckpointError(f"{model_dir}: cannot read the directory ({e.strerror or e})") from None
    index = model_dir / INDEX_NAME
    if INDEX_NAME in names:
        weight_map = index_map(model_dir)
        shards = sorted(set(weight_map.values()))
        if SINGLE_NAME in names and SINGLE_NAME not in shards:
            raise CheckpointError(f"{model_dir} holds both {SINGLE_NAME} and {INDEX_NAME} (which does not list it): "
                                  "two copies of the model? Remove one so rtnq converts the one you mean")
        for s in shards:
            if not isinstance(s, str) or "/" in s or s.startswith(".") or not s.isprintable():
                raise CheckpointError(f"{index}: invalid shard name {s!r}")
            if s not in names:
                raise CheckpointError(
                    f"{index.name} lists shard {s}, which is missing from {model_dir}; download it again"
                )
            _regular_file(model_dir / s, f"the shard {index.name} lists")
        for s in shards:  # "-00001-of-00002": the numbering says which shards the index must list
            m = _SHARD_OF.fullmatch(s)
            if m:
                width, total = len(m.group(2)), int(m.group(3))
                expected = {f"{m.group(1)}-{i:0{width}d}-of-{m.group(3)}.safetensors" for i in range(1, total + 1)}
                missing = sorted(expected - set(shards))
                if missing:
                    raise CheckpointError(f"{index.name} lists {len(shards)} of the {total} shards its names number "
                                          f"(no tensor in {missing[0]}); the index is incomplete, fix it")
        return shards
    if SINGLE_NAME in names:
        _regular_file(model_dir / SINGLE_NAME, "the model file")
        return [SINGLE_NAME]
    found = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if len(found) > 1 and not _one_numbered_set(found):
        raise CheckpointError(f"{model_dir} holds {len(found)} .safetensors files and no {INDEX_NAME}: "
                              f"{', '.join(found[:4])}{' ...' if len(found) > 4 else ''}; rtnq cannot tell which form "
                              "the model (e.g. consolidated.safetensors beside shards). Add the index or remove the others")
    for name in found:
        _regular_file(model_dir / name, "the shard")
    if found:
        return found
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{model_dir} holds only pickle weights ({', '.join(pickles[:3])}); rtnq never unpickles model "
            "files. Convert them to safetensors first (e.g. save_pretrained(..., safe_serialization=True))"
        )
    raise CheckpointError(f"{model_dir}: no .safetensors files found")


def read_json_object(path: Path) -> dict:
    """A checkpoint's JSON file (config.json, quantize_config.json) as a dict; CheckpointError otherwise."""
    return jsonfile.read_object(path)


def small_files(src: Path) -> list[str]:
    """Top-level non-weight files to copy unchanged (config.json is rewritten, not copied)."""
    keep = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name in (CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, GPTQ_CONFIG_NAME):
            continue
        if p.suffix in WEIGHT_SUFFIXES or p.stat().st_size > MAX_COPY_BYTES:
            continue
        keep.append(p.name)
    return keep


def _text_config(src: Path) -> dict:
    """config.json (its text model's part where there is one), {} when absent or broken: the callers are best
    effort, and a broken config.json is reported, with its reason, when convert rewrites it."""
    try:
        cfg = jsonfile.read_object(src / CONFIG_NAME)
    except CheckpointError:
        return {}
    text = cfg.get("text_config")
    return text if isinstance(text, dict) else cfg


def model_type(src: Path) -> str:
    """config.json's model_type (of the text model where there is one), '' if unknown. Best effort."""
    value = _text_config(src).get("model_type", "")
    return value if isinstance(value, str) else ""


def kv_heads(src: Path) -> int | None:
    """num_key_value_heads (else num_attention_heads) from config.json, for the TP check; None if unknown."""
    cfg = _text_config(src)
    heads = cfg.get("num_key_value_heads", cfg.get("num_attention_heads"))
    return heads if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0 else None
