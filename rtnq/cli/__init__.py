"""The `rtnq` command line: argument parsing, rich output and exit codes. No math lives here.

One error boundary (`main`): library code raises RtnqError subclasses, and click raises its usage
errors (unknown option, missing argument, bad value); both become one red `error:` line on stderr
and a documented exit code (rtnq.errors; 2 for usage). RTNQ_DEBUG=1 re-raises RtnqError for the
traceback. Results (tables, summaries) go to stdout, progress and warnings to stderr (rtnq.cli.app).
"""


from __future__ import annotations

import gc
import importlib
import signal
import sys

import typer
from rich.markup import escape

# Importing a command module registers it on `app`; the order here is the order of `rtnq --help`.
from rtnq.cli import convert, inspect, verify, dequantize, eval, sample, bench  # noqa: F401,E402
from rtnq.cli.app import app, err, out  # noqa: F401  (rtnq.cli.err/out: the two consoles, for tests)
from rtnq.errors import RtnqError, Terminated, report

# click's exception classes, from wherever this typer takes click: recent typer vendors a copy
# (typer._click), older typer uses the click package. typer.BadParameter is public in both.
click_exc = importlib.import_module(typer.BadParameter.__module__)
# click >= 8.2 raises this for a bare `rtnq` (no_args_is_help); older click exits 0 after the help.
NoArgsIsHelp = getattr(click_exc, "NoArgsIsHelpError", ())


def main() -> None:
    # Everything imported so far (torch, typer, rich) lives until exit: freezing it keeps the cyclic
    # GC from re-scanning it during the run and at interpreter shutdown (0.3-0.6 s with torch loaded).
    gc.freeze()
    _terminate_like_ctrl_c()
    try:
        # standalone_mode=False: click raises its usage errors instead of printing a boxed panel, so
        # they get the same one-line style as rtnq's own; --help returns 0 through ctx.exit. (A reader
        # closing the pipe, `rtnq inspect OUT | head`, typer still handles: silent exit 1.)
        # prog_name: `python -m rtnq.cli` is the same program; its messages say `rtnq`.
        code = app(standalone_mode=False, prog_name="rtnq")
    except (RtnqError, KeyboardInterrupt) as e:
        if isinstance(getattr(e, "__context__", None), Terminated) and not isinstance(e, Terminated):
            e = e.__context__  # a command turned the signal into its own "interrupted": keep the signal's code
        reported = report(e)
        if reported is None:
            raise
        _error(*reported)
    except NoArgsIsHelp:
        # Bare `rtnq`: click printed the help while building this error; exit 2 as before.
        sys.exit(2)
    except click_exc.UsageError as e:
        _error(_usage_message(e), e.exit_code)
    except click_exc.ClickException as e:
        _error(e.format_message(), e.exit_code)
    except typer.Abort:
        _error("interrupted", 130)
    # Outside a command, click reports a Ctrl-C as exit code 130 (typer turns KeyboardInterrupt into
    # Exit(130)); every other code here is --help's 0 or a command's None.
    if code == 130:
        _error("interrupted", 130)
    sys.exit(code if isinstance(code, int) else 0)


def _terminate_like_ctrl_c() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C (temporary output removed), with exit code 128 + signal."""
    def handler(signum, frame):
        raise Terminated(signum, signal.Signals(signum).name)

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError):  # not the main thread (embedded use): leave the default
                pass


def _error(message: str, code: int) -> None:
    # Messages quote user input and shell commands ("pip install 'rtnq[plot]'"): never markup.
    err.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _usage_message(e) -> str:
    """click's usage error as one line: `--bits: must be 4 or 8`, `missing argument OUT; try ...`."""
    param = getattr(e, "param", None)
    if isinstance(e, click_exc.MissingParameter) and param is not None:
        kind = "argument" if param.param_type_name == "argument" else "option"
        message = f"missing {kind} {_param_name(param)}"
    elif isinstance(e, click_exc.BadParameter):
        hint = e.param_hint if e.param_hint is not None else (_param_name(param) if param else None)
        if isinstance(hint, (list, tuple)):
            hint = "/".join(hint)
        # A bad value names its option and says what is allowed: nothing to add.
        return f"{hint.strip(chr(39))}: {_sentence(e.message)}" if hint else _sentence(e.message)
    else:
        message = _sentence(e.format_message())  # keeps click's "(Possible options: ...)"
    # Without a context click cannot tell which command was parsing; a wrong pointer is worse than none.
    return f"{message}; try {e.ctx.command_path} --help" if e.ctx is not None else message


def _sentence(text: str) -> str:
    text = text.strip().rstrip(".")
    if text[:2].istitle():  # click's sentences start upper-case ("Missing ..."); rtnq's do not
        text = text[0].lower() + text[1:]
    return text


def _param_name(param) -> str:
    if param.param_type_name == "argument":
        return (param.name or "").upper()  # as the README's usage lines spell them: SRC, OUT
    return "/".join(param.opts)
