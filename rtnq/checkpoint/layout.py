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

import json
import re
from pathlib import Path

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
    """A local model directory; a hub id is recognised and refused with the download command."""
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists():
        raise UsageError(f"{src} is a file; pass the model directory that contains it")
    if HUB_ID.match(str(src)):
        raise UsageError(
            f"{src} looks like a Hugging Face hub id; hub downloads are not supported yet. Run "
            f"`huggingface-cli download {src} --local-dir DIR` and pass DIR"
        )
    raise UsageError(f"{src}: no such directory")


def index_map(model_dir: Path) -> dict[str, str] | None:
    """The index's weight_map (tensor -> shard file), or None when the directory has no index."""
    index = model_dir / INDEX_NAME
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError,
            RecursionError):
        raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
    if not weight_map:
        raise CheckpointError(f"{index}: its weight_map lists no tensor; the index is broken, fix or remove it")
    return weight_map


_SHARD_OF = re.compile(r"(.+)-(\d+)-of-(\d+)\.safetensors")


def _one_numbered_set(names: list[str]) -> bool:
    """All of `names` are the shards prefix-i-of-N of one complete numbered set."""
    matches = [_SHARD_OF.fullmatch(n) for n in names]
    if not all(matches) or len({(m.group(1), m.group(3)) for m in matches}) != 1:
        return False
    return len(names) == int(matches[0].group(3))


def shard_files(model_dir: Path) -> list[str]:
    """The shard file names of a model directory, from its index or its single file."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = index_map(model_dir)
        shards = sorted(set(weight_map.values()))
        if (model_dir / SINGLE_NAME).is_file() and SINGLE_NAME not in shards:
            raise CheckpointError(f"{model_dir} holds both {SINGLE_NAME} and {INDEX_NAME} (which does not list it): "
                                  "two copies of the model? Remove one so rtnq converts the one you mean")
        for s in shards:
            if not isinstance(s, str) or "/" in s or s.startswith("."):
                raise CheckpointError(f"{index}: invalid shard name {s!r}")
            if not (model_dir / s).is_file():
                raise CheckpointError(
                    f"{index.name} lists shard {s}, which is missing from {model_dir}; download it again"
                )
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
    if (model_dir / SINGLE_NAME).is_file():
        return [SINGLE_NAME]
    found = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if len(found) > 1 and not _one_numbered_set(found):
        raise CheckpointError(f"{model_dir} holds {len(found)} .safetensors files and no {INDEX_NAME}: "
                              f"{', '.join(found[:4])}{' ...' if len(found) > 4 else ''}; rtnq cannot tell which form "
                              "the model (e.g. consolidated.safetensors beside shards). Add the index or remove the others")
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
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


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


def model_type(src: Path) -> str:
    """config.json's model_type (of the text model where there is one), '' if unknown. Best effort."""
    try:
        cfg = json.loads((src / CONFIG_NAME).read_text())
        cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
        value = cfg.get("model_type", "")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


def kv_heads(src: Path) -> int | None:
    """num_key_value_heads (else num_attention_heads) from config.json, for the TP check; None if unknown.
    Best effort: a broken config.json is reported when it is rewritten, not here."""
    try:
        cfg = json.loads((src / CONFIG_NAME).read_text())
        cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
        heads = cfg.get("num_key_value_heads", cfg.get("num_attention_heads"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return heads if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0 else None


