"""Optional figures (matplotlib): the precision map of `rtnq inspect --plot`."""

from __future__ import annotations

from rtnq.errors import UsageError
from rtnq.commands.precision_map import PrecisionMap

COLORS = {"int4": "#2e7d32", "int8": "#f9a825"}  # anything else (16/32-bit) is grey


# Both spellings: an installed rtnq takes the extra by name, a source checkout installs itself with it.
INSTALL_HINT = "pip install 'rtnq[plot]' (or, from a source checkout: pip install -e '.[plot]')"


def pyplot():
    """matplotlib.pyplot, or the UsageError saying how to install it.

    Commands with --plot call this before printing anything, so a missing matplotlib is the one line
    the user sees rather than an error after a screenful of tables.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(f"--plot needs matplotlib: {INSTALL_HINT}") from None
    return plt


def precision_map_png(pm: PrecisionMap, path: str) -> None:
    """Draw layers (rows) x modules (columns), one colored cell per precision, into `path`."""
    plt = pyplot()
    from matplotlib.patches import Patch

    rows, cols = max(1, len(pm.layers)), max(1, len(pm.modules))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * cols, 1.0 + 0.25 * rows))
    labels = set()
    for r, layer in enumerate(pm.layers):
        for c, module in enumerate(pm.modules):
            v = pm.cells.get((layer, module))
            if v is None:
                continue
            labels.add(v)
            ax.add_patch(plt.Rectangle((c, r), 0.95, 0.9, color=COLORS.get(v, "#9e9e9e")))
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_xticks([c + 0.475 for c in range(len(pm.modules))], [m.split(".")[-1] for m in pm.modules], rotation=45, ha="right")
    ax.set_yticks([r + 0.45 for r in range(len(pm.layers))], [str(x) for x in pm.layers])
    ax.set_ylabel("layer")
    ax.set_title("rtnq precision map")
    ax.legend(handles=[Patch(color=COLORS.get(v, "#9e9e9e"), label=v) for v in sorted(labels)],
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
