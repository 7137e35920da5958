"""What `rtnq bench` times: linear-layer shapes, from a converted checkpoint or a synthetic model table.

Pure Python (no torch): the tables here are the real layer shapes of public models, so that random
weights of these shapes can be generated on a GPU machine that cannot download checkpoints.
Shapes follow the HF convention: a linear weight is (n, k) = (out_features, in_features), and
`y = x @ W.T` for activations x of shape (M, k).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rtnq.errors import UsageError


@dataclass(frozen=True)
class Linear:
    """One family of identically shaped linears of a model: `count` of them per forward."""

    name: str  # role ("qkv", "o", "gate_up", "down", "lm_head") or a module name
    n: int  # out_features
    k: int  # in_features
    count: int  # how many such linears one forward runs (layers, or 1 for lm_head)


@dataclass(frozen=True)
class Model:
    """A synthetic model: its per-layer linears (q/k/v and gate/up fused, as inference engines run
    them), its layer count and its lm_head. `quantize_lm_head` says what the linear-stack figure
    assumes: rtnq's default conversion keeps lm_head in 16-bit (DESIGN.md section 5)."""

    name: str
    layers: int
    body: tuple[tuple[str, int, int], ...]  # (role, n, k) per layer
    lm_head: tuple[int, int]  # (n = vocab, k = hidden)
    quantize_lm_head: bool = False

    def linears(self) -> list[Linear]:
        out = [Linear(role, n, k, self.layers) for role, n, k in self.body]
        out.append(Linear("lm_head", self.lm_head[0], self.lm_head[1], 1))
        return out


def _llama(name: str, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
           intermediate: int, vocab: int = 128256) -> Model:
    qkv = (heads + 2 * kv_heads) * head_dim
    return Model(
        name=name,
        layers=layers,
        body=(
            ("qkv", qkv, hidden),
            ("o", hidden, heads * head_dim),
            ("gate_up", 2 * intermediate, hidden),
            ("down", hidden, intermediate),
        ),
        lm_head=(vocab, hidden),
    )


# Llama-3.1-8B: qkv n=6144 k=4096, o 4096x4096, gate_up n=28672 k=4096, down n=4096 k=14336,
# lm_head n=128256 k=4096, 32 layers. 70B: qkv n=10240 k=8192, o 8192x8192, gate_up n=57344 k=8192,
# down n=8192 k=28672, 80 layers. (Llama-3.2 1B/3B from their published config.json files.)
SYNTHETIC: dict[str, Model] = {
    m.name: m
    for m in (
        _llama("llama-3.1-8b", 32, 4096, 32, 8, 128, 14336),
        _llama("llama-3.1-70b", 80, 8192, 64, 8, 128, 28672),
        _llama("llama-3.2-1b", 16, 2048, 32, 8, 64, 8192),
        _llama("llama-3.2-3b", 28, 3072, 24, 8, 128, 8192),
        # Plumbing checks (tests, --device cpu): Marlin-legal shapes that run in milliseconds on a CPU.
        _llama("tiny", 2, 256, 4, 2, 64, 256, vocab=512),
    )
}


@dataclass(frozen=True)
class QuantConfig:
    bits: int
    group_size: int  # 32, 64, 128 or -1 (channelwise)


@dataclass
class ShapeGroup:
    """All quantized configurations of one weight shape (n, k): the dense baselines are timed once
    per shape and shared by every (bits, group_size) configuration of it."""

    name: str
    n: int
    k: int
    count: int  # linears of this shape per forward, over all configurations
    configs: list[QuantConfig] = field(default_factory=list)
    members: dict[QuantConfig, list[str]] = field(default_factory=dict)  # config -> module names

    @property
    def label(self) -> str:
        return f"{self.name} {self.n}x{self.k}"


def synthetic_groups(model: Model, bits: list[int], group_size: int) -> list[ShapeGroup]:
    configs = [QuantConfig(b, group_size) for b in bits]
    return [ShapeGroup(lin.name, lin.n, lin.k, lin.count, list(configs)) for lin in model.linears()]


def role_of(name: str) -> str:
    """A short role label for a tensor name (`model.layers.3.mlp.down_proj.weight` -> `down_proj`)."""
    parts = [p for p in name.split(".") if p]
    if len(parts) > 1 and parts[-1] == "weight":
        parts = parts[:-1]
    return parts[-1] if parts else name


def checkpoint_groups(entries: dict[str, tuple[int, int, int, int]]) -> list[ShapeGroup]:
    """Group quantized linears by weight shape.

    entries: tensor name -> (n, k, bits, group_size) for every 2-D Marlin tensor of a manifest.
    Returns one ShapeGroup per distinct (n, k), in order of first appearance (sorted by name), named
    by the roles of its members (`q_proj/k_proj` if several share a shape).
    """
    groups: dict[tuple[int, int], ShapeGroup] = {}
    for module in sorted(entries):
        n, k, bits, group_size = entries[module]
        g = groups.get((n, k))
        if g is None:
            g = groups[(n, k)] = ShapeGroup(role_of(module), n, k, 0)
        cfg = QuantConfig(bits, group_size)
        if cfg not in g.members:
            g.configs.append(cfg)
            g.members[cfg] = []
        g.members[cfg].append(module)
        g.count += 1
        role = role_of(module)
        if role not in g.name.split("/"):
            g.name = f"{g.name}/{role}"
    return list(groups.values())


def parse_int_list(text: str, what: str, *, allowed: tuple[int, ...] | None = None) -> list[int]:
    """'1,16,64' -> [1, 16, 64] (sorted, unique); UsageError naming `what` on anything else."""
    values: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = int(part)
        except ValueError:
            raise UsageError(f"{what}: {part!r} is not an integer (expected a comma list like 1,16,64)") from None
        if v < 1 or (allowed is not None and v not in allowed):
            choice = f"one of {', '.join(map(str, allowed))}" if allowed else "a positive integer"
            raise UsageError(f"{what}: {v} is not {choice}")
        values.add(v)
    if not values:
        raise UsageError(f"{what}: empty list")
    return sorted(values)


def synthetic_model(name: str) -> Model:
    try:
        return SYNTHETIC[name.lower()]
    except KeyError:
        raise UsageError(
            f"--synthetic {name!r} is not a known model; choose one of {', '.join(SYNTHETIC)}"
        ) from None


def filter_groups(groups: list[ShapeGroup], only: str | None) -> list[ShapeGroup]:
    """Keep the shape groups whose name contains one of the comma-separated tokens of `only`."""
    if not only:
        return groups
    tokens = [t.strip() for t in only.split(",") if t.strip()]
    kept = [g for g in groups if any(t == part for t in tokens for part in g.name.split("/"))]
    if not kept:
        raise UsageError(
            f"--shapes {only!r} matches none of: {', '.join(g.name for g in groups)}"
        )
    return kept
