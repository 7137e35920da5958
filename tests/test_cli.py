"""The command line in a pipe: results on stdout, progress/warnings/errors on stderr, whole tensor names
when stdout is not a terminal, one-line usage errors, and verify's and the hints' reporting rules.

Streams are checked through the real entry point in a separate process (`python -m rtnq.cli`), so rich
sees real pipes and terminals; the in-process runner is used only where a test must patch something.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import save_file

from cliutil import run, run_process
from rtnq import synthetic
from rtnq.checkpoint import manifest as mf

# Longer than any terminal line: a table squeezed to the terminal's width would cut or wrap it.
LONG = "model.language_model.a_deliberately_long_module_path_that_no_terminal_would_fit_on_one_line"
EMBED = f"{LONG}.embed_tokens_of_the_multimodal_projector.weight"
ODD = f"{LONG}.layers.0.mlp.odd_proj.weight"  # k = 200: no group size divides it, a warning
NARROW = {"COLUMNS": "40"}  # what rich would size every table to, were stdout not handled


def _long_names(path):
    g = torch.Generator().manual_seed(0)

    def w(n, k):
        return (0.02 * torch.randn(n, k, generator=g)).bfloat16()

    tensors = {EMBED: w(512, 256), ODD: w(96, 200)}
    for i in range(2):
        for module, shape in (("self_attn.q_proj", (256, 256)), ("self_attn.k_proj", (128, 256)),
                              ("self_attn.v_proj", (128, 256)), ("self_attn.o_proj", (256, 256)),
                              ("mlp.down_proj", (256, 512))):
            tensors[f"{LONG}.layers.{i}.{module}.weight"] = w(*shape)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text('{"num_attention_heads": 4, "num_key_value_heads": 2}')
    return path, sorted(tensors)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    src, names = _long_names(root / "src")
    out = root / "out"
    p = run_process("convert", src, out, env=NARROW)
    assert p.returncode == 0, p.stderr
    return src, out, names, p


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The default sample (hidden 256): TP2 ok, TP4 and TP8 fail. Converted once."""
    root = tmp_path_factory.mktemp("sample")
    src = synthetic.write_checkpoint(root / "src", synthetic.SampleSpec())
    assert run("convert", src, root / "out").code == 0
    return src, root / "out"


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _plain(text: str) -> None:
    assert "\x1b" not in text, "color codes in output that is not a terminal"


# ------------------------------------------------------------------------------------------------ streams

def test_convert_summary_on_stdout_warnings_on_stderr(long_model):
    _, out, _, p = long_model
    _plain(p.stdout)
    assert "summary" in p.stdout and "bits per weight" in p.stdout
    assert f"wrote {out}" in p.stdout
    assert "tensor parallel (Marlin shape rules per rank)" in p.stdout
    assert _lines(p.stderr) and all(line.startswith("warning: ") for line in _lines(p.stderr)), p.stderr
    assert ODD in p.stderr and "warning" not in p.stdout


def test_inspect_tables_on_stdout_whole_names_when_piped(long_model):
    _, out, _, _ = long_model
    p = run_process("inspect", out, env=NARROW)
    assert p.returncode == 0, p.stderr
    _plain(p.stdout)
    assert p.stdout.startswith("format: rtnq-marlin")
    assert "precision by layer and module" in p.stdout and "outside the blocks" in p.stdout
    assert EMBED in p.stdout  # the outside-the-blocks table, one name on one line
    assert "summary" in p.stdout and "tensor parallel" in p.stdout
    warnings = mf.read(out).warnings
    assert warnings and _lines(p.stderr) == [f"warning: {w}" for w in warnings]  # whole, one line each
    assert "warning" not in p.stdout


def test_dry_run_plan_and_verify_all_keep_every_name_whole(long_model, tmp_path):
    src, out, names, _ = long_model
    plan = run_process("convert", src, tmp_path / "never", "--dry-run", env=NARROW)
    assert plan.returncode == 0, plan.stderr
    assert "dry run" in plan.stdout and all(name in plan.stdout for name in names)
    assert "dry run" not in plan.stderr
    every = run_process("verify", out, "--against", src, "--all", env=NARROW)
    assert every.returncode == 0 and every.stderr == ""
    assert all(name in every.stdout for name in names)
    # No line of the table is longer than it needs to be: rich pads nothing to a huge width.
    assert max(map(len, every.stdout.splitlines())) < len(names[0]) + 60


def test_json_stays_pure_on_stdout(long_model, tmp_path):
    src, out, _, _ = long_model
    runs = {}
    for args in (("inspect", out), ("verify", out, "--against", src),
                 ("convert", src, tmp_path / "j", "--dry-run"), ("convert", src, tmp_path / "j"),
                 ("dequantize", out, tmp_path / "dense")):
        p = runs[args[0]] = run_process(*args, "--json", env=NARROW)
        assert p.returncode == 0, (args, p.stderr)
        json.loads(p.stdout)
    # inspect and verify have nothing else to say; convert keeps its warnings and TP line on stderr.
    assert runs["inspect"].stderr == "" and runs["verify"].stderr == ""
    assert "warning: " in runs["convert"].stderr and "tensor parallel" in runs["convert"].stderr


def test_dequantize_and_sample_results_on_stdout(long_model, tmp_path):
    _, out, _, _ = long_model
    p = run_process("dequantize", out, tmp_path / "dense")
    assert p.returncode == 0 and p.stderr == ""
    assert "dequantized 10 rtnq modules" in p.stdout and f"wrote {tmp_path / 'dense'}" in p.stdout
    p = run_process("sample", tmp_path / "s")
    assert p.returncode == 0 and p.stderr == "" and p.stdout.strip() == f"wrote {tmp_path / 's'}"


def _with_terminal_stderr(*args) -> tuple[int, str, str]:
    """Run `rtnq ARGS` with stderr on a 50-column pseudo-terminal and stdout on a pipe:
    (exit code, stdout, what the terminal showed)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 50, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen([sys.executable, "-m", "rtnq.cli", *map(str, args)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    stdout = proc.stdout.read().decode()
    proc.wait()
    reader.join()
    os.close(master)
    return proc.returncode, stdout, b"".join(chunks).decode()


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_progress_on_a_terminal_stderr_leaves_stdout_whole(long_model, tmp_path):
    """`rtnq convert SRC OUT > log` in a 50-column terminal: the progress bar is drawn on the terminal
    (stderr), while the log gets the summary at full width and no escape codes."""
    src, _, _, _ = long_model
    code, stdout, terminal = _with_terminal_stderr("convert", src, tmp_path / "o", "--dry-run")
    assert code == 0, terminal
    _plain(stdout)
    assert EMBED in stdout and "summary" in stdout
    assert "warning" in terminal and "summary" not in terminal

    # A real conversion draws its progress bar there too.
    code, stdout, terminal = _with_terminal_stderr("convert", src, tmp_path / "o")
    assert code == 0, terminal
    assert "tensors" in terminal and "\x1b[" in terminal  # "0/12 tensors" and the bar's colors
    _plain(stdout)
    assert f"wrote {tmp_path / 'o'}" in stdout


def test_a_closed_pipe_is_not_a_traceback(long_model):
    """`rtnq inspect OUT | head`: the reader may go away; no traceback on stderr."""
    _, out, _, _ = long_model
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "rtnq.cli", "inspect", out], stdout=w, stderr=subprocess.PIPE,
                           text=True, check=False)
    finally:
        os.close(w)
    assert "Traceback" not in p.stderr and "Error" not in p.stderr, p.stderr


# ------------------------------------------------------------------------------------------------ verify

def test_verify_prints_a_summary_and_only_the_failures(sample, tmp_path):
    src, out = sample
    n = len(mf.read(out).tensors)
    ok = run_process("verify", out, "--against", src)
    assert ok.returncode == 0 and ok.stderr == ""
    assert _lines(ok.stdout) == [f"ok: all {n} tensors match (7 passthrough, 14 quantized)"]

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shard = broken / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01  # inside the last tensor of the file
    shard.write_bytes(bytes(data))
    bad = run_process("verify", broken, "--against", src)
    assert bad.returncode == 7
    rows = [line for line in bad.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 1 and "differ" in rows[0]  # the one failing tensor, no "identical" rows
    assert "identical" not in bad.stdout
    assert _lines(bad.stdout)[-1] == f"FAILED: 1 of {n} tensors differ (7 passthrough, 14 quantized checked); --all lists every tensor"
    assert len(_lines(bad.stderr)) == 1 and bad.stderr.startswith(f"error: 1 of {n} tensors differ, first: ")

    every = run_process("verify", broken, "--against", src, "--all")
    assert every.returncode == 7
    rows = [line for line in every.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == n and sum("identical" in row for row in rows) == n - 1
    assert "--all lists" not in every.stdout


def test_verify_against_a_source_of_other_shapes_is_one_line(sample, tmp_path):
    _, out = sample
    wider = synthetic.write_checkpoint(tmp_path / "wider", synthetic.SampleSpec(hidden=512))
    p = run_process("verify", out, "--against", wider)
    # 7, not 4 (rtnq.commands.verify): the source is readable; it is not the one OUT came from.
    assert p.returncode == 7 and p.stdout == ""
    (line,) = _lines(p.stderr)
    # Every tensor of the sample has the hidden size in its shape: all 21 differ.
    assert line.startswith(f"error: {wider} does not match the manifest of {out}: 21 tensors differ in name/shape")
    assert "in the source" in line and "in the manifest" in line

    deeper = synthetic.write_checkpoint(tmp_path / "deeper", synthetic.SampleSpec(layers=3))
    p = run_process("verify", out, "--against", deeper)
    assert p.returncode == 7 and p.stdout == ""
    (line,) = _lines(p.stderr)
    assert "9 tensors differ in name/shape" in line and "model.layers.2." in line and "is not in the manifest" in line


def test_verify_against_same_shapes_other_weights_asks_about_the_source(sample, tmp_path):
    _, out = sample
    other = synthetic.write_checkpoint(tmp_path / "other", synthetic.SampleSpec(seed=7))
    p = run_process("verify", out, "--against", other)
    assert p.returncode == 7
    (line,) = _lines(p.stderr)
    assert line.startswith("error: 21 of 21 tensors differ, first: ")
    assert line.endswith(f"; is {other} the checkpoint {out} was converted from?")


# ------------------------------------------------------------------------------------------------ usage errors

@pytest.mark.parametrize("args,expected", [
    (["convert", "a", "b", "--bits", "5"], "error: --bits: must be 4 or 8"),
    (["convert", "a", "b", "--group-size", "100"], "error: --group-size: must be 32, 64, 128 or -1"),
    (["convert", "a", "b", "--format", "awq"], "error: --format: must be marlin, gptq or compressed-tensors"),
    (["convert", "a", "b", "--tp", "two"], "error: --tp: must be a comma list of integers"),
    (["convert", "a", "b", "--bits"], "error: option '--bits' requires an argument"),
    (["convert", "a"], "error: missing argument OUT; try rtnq convert --help"),
    (["convert", "a", "b", "--nope"], "error: no such option: --nope"),
    (["convert", "a", "b", "c"], "error: got unexpected extra argument"),
    (["verify", "x"], "error: missing option --against; try rtnq verify --help"),
    (["sample", "x", "--layers", "abc"], "error: --layers: "),
    (["bogus"], "error: no such command 'bogus'; try rtnq --help"),
])
def test_usage_errors_are_one_line(args, expected):
    p = run_process(*args)
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    (line,) = _lines(p.stderr)
    assert line.startswith(expected), line
    assert not any(box in p.stderr for box in "╭│╰"), p.stderr  # no rich panel
    assert "Usage:" not in p.stderr


def test_help_still_works():
    p = run_process("--help")
    assert p.returncode == 0 and "convert" in p.stdout and "verify" in p.stdout and p.stderr == ""
    p = run_process("verify", "--help")
    assert p.returncode == 0 and "--against" in p.stdout and "--all" in p.stdout
    # A bare `rtnq` shows the help too, as a usage error (exit 2), as it did with click's own handling.
    p = run_process()
    assert p.returncode == 2 and "convert" in p.stdout and "error" not in p.stderr


def test_interrupt_outside_convert_is_130(monkeypatch, sample):
    from rtnq.checkpoint import manifest

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(manifest, "read", interrupted)
    r = run("inspect", sample[1])
    assert r.code == 130 and _lines(r.err) == ["error: interrupted"] and r.out == ""


# ------------------------------------------------------------------------------------------------ hints

def test_plot_without_matplotlib_fails_before_any_table(monkeypatch, sample):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    r = run("inspect", sample[1], "--plot", "map.png")
    assert r.code == 2 and r.out == ""
    (line,) = _lines(r.err)
    assert "pip install 'rtnq[plot]'" in line and "pip install -e '.[plot]'" in line


def test_tp_hint_is_left_off_after_the_command_it_suggests(sample, tmp_path):
    src, out = sample
    hint = "(rtnq convert --dry-run --tp 4,8 lists them)"
    inspect = run_process("inspect", out)
    (tp_line,) = [line for line in inspect.stdout.splitlines() if line.startswith("tensor parallel")]
    assert "TP2 ok" in tp_line and tp_line.endswith(hint)

    listed = run_process("convert", src, tmp_path / "x", "--dry-run", "--tp", "4,8")
    assert listed.returncode == 0
    assert "tensor parallel 4:" in listed.stdout and "tensor parallel 8:" in listed.stdout  # the lists
    (tp_line,) = [line for line in listed.stdout.splitlines() if line.startswith("tensor parallel (")]
    assert "TP4: 2 quantized tensors fail" in tp_line and "lists them" not in tp_line

    partly = run_process("convert", src, tmp_path / "x", "--dry-run", "--tp", "4")
    (tp_line,) = [line for line in partly.stdout.splitlines() if line.startswith("tensor parallel (")]
    assert tp_line.endswith("(rtnq convert --dry-run --tp 8 lists them)")


def test_error_boundary_policy(monkeypatch):
    """One policy for both entry points (rtnq, python -m rtnq.bench): RtnqError -> its line and code,
    Ctrl-C -> 130, RTNQ_DEBUG=1 or a non-rtnq exception -> re-raise (None)."""
    from rtnq import errors

    monkeypatch.delenv("RTNQ_DEBUG", raising=False)
    assert errors.report(errors.VerifyMismatch("2 tensors differ")) == ("2 tensors differ", 7)
    assert errors.report(KeyboardInterrupt()) == ("interrupted", 130)
    assert errors.report(ValueError("bug")) is None
    monkeypatch.setenv("RTNQ_DEBUG", "1")
    assert errors.report(errors.UsageError("x")) is None
