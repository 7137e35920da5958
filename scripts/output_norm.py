"""Hash of one output file with the manifest version taken out (scripts/output_hashes.sh)."""

import hashlib, json, struct, sys
from pathlib import Path
# Hash of a file with the manifest version (the one deliberate change) taken out.
p = Path(sys.argv[1])
b = p.read_bytes()
if p.suffix == ".safetensors":
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    h.get("__metadata__", {}).pop("manifest_version", None)
    b = json.dumps(h, sort_keys=True).encode() + b[8 + n:]
elif p.name == "config.json":
    c = json.loads(b)
    c.get("quantization_config", {}).pop("manifest_version", None)
    b = json.dumps(c, sort_keys=True).encode()
print(hashlib.sha256(b).hexdigest()[:16])
