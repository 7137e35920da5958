"""The I/O floor of issue 4: import torch + safetensors, read every tensor, write a quarter of its bytes.

    python scripts/io_floor.py SRC OUT

What any Python converter of SRC must at least do: start Python and torch, read every tensor of
every shard (safetensors' own loader, which maps whole shards) and write an output a quarter of the
size (about what 4-bit weights are), one safetensors file per source shard. No quantization.
"""

import sys
from pathlib import Path

import torch  # noqa: F401  (the start-up cost is part of the floor)
from safetensors import safe_open
from safetensors.torch import save_file


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True)
    for shard in sorted(src.glob("*.safetensors")):
        kept = {}
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                kept[name] = t.reshape(-1)[: t.numel() // 4].clone()
        save_file(kept, str(out / shard.name))


if __name__ == "__main__":
    main()
