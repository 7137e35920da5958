"""The import rules of docs/ARCHITECTURE.md, checked on the source: every rtnq module imports only from its
own layer or the ones below it (function-level imports included), and the torch-free layers stay torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "rtnq"

# Each area, and the areas it may import from. Lower layers never import higher ones.
BASE = {"rtnq.errors", "rtnq.params", "rtnq.dtypes"}
ALLOWED = {
    "rtnq.errors": set(),
    "rtnq.dtypes": set(),
    "rtnq.params": {"rtnq.errors", "rtnq.dtypes"},
    "rtnq.numerics": BASE,
    "rtnq.selection": BASE | {"rtnq.numerics"},
    "rtnq.formats": BASE | {"rtnq.numerics", "rtnq.selection"},
    "rtnq.checkpoint": BASE | {"rtnq.numerics", "rtnq.formats"},
    "rtnq.synthetic": BASE | {"rtnq.checkpoint"},
    "rtnq.hub": BASE | {"rtnq.checkpoint"},
    "rtnq.commands": BASE | {"rtnq.numerics", "rtnq.selection", "rtnq.formats", "rtnq.checkpoint", "rtnq.hub"},
    "rtnq.runtime": BASE | {"rtnq.numerics", "rtnq.selection", "rtnq.formats", "rtnq.checkpoint"},
    "rtnq.bench": BASE | {"rtnq.numerics", "rtnq.selection", "rtnq.formats", "rtnq.checkpoint", "rtnq.runtime",
                          "rtnq.synthetic"},
    "rtnq.cli": BASE | {"rtnq.numerics", "rtnq.selection", "rtnq.formats", "rtnq.checkpoint", "rtnq.commands",
                        "rtnq.runtime", "rtnq.bench", "rtnq.synthetic", "rtnq.hub"},
}
# Modules that must import without torch (planning, selection, the CLI's option checks).
TORCH_FREE = ["rtnq.errors", "rtnq.dtypes", "rtnq.params", "rtnq.selection.precision", "rtnq.selection.tp",
              "rtnq.formats", "rtnq.formats.engine_config", "rtnq.checkpoint.layout",
              "rtnq.hub.client", "rtnq.hub.repo", "rtnq.hub.staging",
              # the convert path (issue 15): numpy around the C kernel; torch only for its reference
              "rtnq.numerics.cpu", "rtnq.numerics.halfcast", "rtnq.numerics.buffers",
              "rtnq.checkpoint.source", "rtnq.checkpoint.writer", "rtnq.checkpoint.pipeline",
              "rtnq.checkpoint.shards", "rtnq.checkpoint.journal", "rtnq.checkpoint.fp8",
              "rtnq.checkpoint.manifest", "rtnq.checkpoint.outdir", "rtnq.checkpoint.refusals",
              "rtnq.commands.convert", "rtnq.commands.convert.plan", "rtnq.commands.convert.execute",
              "rtnq.commands.convert.outputs", "rtnq.commands.convert.resume", "rtnq.commands.convert.hub_source",
              "rtnq.commands.precision_map",
              "rtnq.cli"]  # `rtnq --help` and the option checks: torch loads inside a command, when needed


def _area(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this package
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from rtnq import dtypes` imports the module rtnq.dtypes
            out |= {f"{base}.{a.name}" for a in node.names} if base == "rtnq" else {base}
    return {m for m in out if m == "rtnq" or m.startswith("rtnq.")}


def test_every_area_has_a_rule():
    assert {_area(m) for m, _ in _modules() if m != "rtnq"} <= set(ALLOWED)


@pytest.mark.parametrize("module,path", list(_modules()), ids=[m for m, _ in _modules()])
def test_imports_go_one_way(module, path):
    if module == "rtnq":
        return
    area = _area(module)
    bad = sorted(m for m in _imports(module, path) if _area(m) != area and _area(m) not in ALLOWED[area])
    assert not bad, f"{module} ({area}) imports {bad}; allowed: {sorted(ALLOWED[area])}"


def test_the_rules_can_fail(tmp_path):
    """The checker itself sees a forbidden import, including one inside a function."""
    fake = tmp_path / "fused.py"
    fake.write_text("def f():\n    from rtnq.commands import convert\n")
    assert _imports("rtnq.numerics.fused", fake) == {"rtnq.commands"}


@pytest.mark.parametrize("module", TORCH_FREE)
def test_torch_free_modules(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'imports torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


_NO_TORCH_AFTER = """
import sys
from rtnq import cli
sys.argv = ["rtnq"] + sys.argv[1:]
try:
    cli.main()
except SystemExit as e:
    assert not e.code, e.code
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "safetensors"))
assert not loaded, loaded
"""


@pytest.mark.parametrize("fmt", ["marlin", "gptq", "compressed-tensors"])
def test_convert_with_the_c_library_never_imports_torch(tmp_path, fmt):
    """Issue 15: `rtnq convert` of the built-in sample (and `rtnq inspect` of its output) load neither torch
    nor safetensors when the C fast path is built. (`rtnq sample` draws its weights with torch's generator.)"""
    from rtnq import synthetic
    from rtnq.numerics import cpu

    if cpu.library() is None:
        pytest.skip("the C fast path is not built")
    src, out = tmp_path / "src", tmp_path / "out"
    synthetic.write_checkpoint(src, synthetic.SampleSpec())
    for argv in (["convert", str(src), str(out), "--format", fmt, "--keep-int8", "layers.0"], ["inspect", str(out)]):
        r = subprocess.run([sys.executable, "-c", _NO_TORCH_AFTER, *argv], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
