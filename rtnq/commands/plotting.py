"""Optional figures (matplotlib): the precision map and RTN error panels of `rtnq inspect --plot`."""

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


GREY = "#9e9e9e"
HATCH_FACE = "#e0e0e0"  # 16-bit cells in the error panel: exact, so no error color, only their why


def _cell_ticks(ax, pm: PrecisionMap) -> None:
    """The shared grid: module columns, layer rows (top to bottom), so both panels read the same way."""
    rows, cols = max(1, len(pm.layers)), max(1, len(pm.modules))
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_xticks([c + 0.475 for c in range(len(pm.modules))], [m.split(".")[-1] for m in pm.modules],
                  rotation=45, ha="right")
    ax.set_yticks([r + 0.45 for r in range(len(pm.layers))], [str(x) for x in pm.layers])
    ax.set_ylabel("layer")


def _precision_panel(ax, pm: PrecisionMap) -> list:
    """Colored cells per precision; returns the legend entries (the figure draws one legend for both panels)."""
    plt = pyplot()
    from matplotlib.patches import Patch

    labels = set()
    for r, layer in enumerate(pm.layers):
        for c, module in enumerate(pm.modules):
            v = pm.cells.get((layer, module))
            if v is None:
                continue
            labels.add(v)
            ax.add_patch(plt.Rectangle((c, r), 0.95, 0.9, color=COLORS.get(v, GREY)))
    _cell_ticks(ax, pm)
    ax.set_title("precision")
    return [Patch(color=COLORS.get(v, GREY), label=v) for v in sorted(labels)]


def _error_norm(values: list[float]):
    """Log scale once the errors span more than 10x (int4 next to int8 is ~10-20x), else linear."""
    from matplotlib.colors import LogNorm, Normalize

    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) > 10 * min(positive):
        return LogNorm(min(positive), max(positive))
    lo, hi = min(values), max(values)
    return Normalize(lo, hi if hi > lo else lo + 1e-12)  # one value only: still a valid (flat) scale


def _error_panel(fig, ax, pm: PrecisionMap) -> list:
    """Errors on a sequential colormap; 16-bit cells hatched with their short why. Returns legend entries."""
    plt = pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Patch

    keys = [(layer, module) for layer in pm.layers for module in pm.modules if (layer, module) in pm.cells]
    values = [e for k in keys if (e := pm.errors.get(k)) is not None]
    cmap = plt.get_cmap("viridis")
    norm = _error_norm(values) if values else None
    for r, layer in enumerate(pm.layers):
        for c, module in enumerate(pm.modules):
            key = (layer, module)
            if key not in pm.cells:
                continue
            err = pm.errors.get(key)
            if err is not None:
                ax.add_patch(plt.Rectangle((c, r), 0.95, 0.9, color=cmap(norm(err))))
                continue
            why = pm.whys.get(key)
            # 16-bit (why known) is hatched; a quantized cell whose manifest has no error is left plain grey.
            ax.add_patch(plt.Rectangle((c, r), 0.95, 0.9, facecolor=HATCH_FACE, edgecolor=GREY,
                                       hatch="///" if why else None, linewidth=0))
            ax.text(c + 0.475, r + 0.45, why or "n/a", ha="center", va="center", fontsize=7, clip_on=True)
    _cell_ticks(ax, pm)
    ax.set_title("RTN error (relative Frobenius)")
    if norm is not None:
        scale = "error (log scale)" if isinstance(norm, LogNorm) else "error"
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=scale)
    if not pm.whys:
        return []
    return [Patch(facecolor=HATCH_FACE, edgecolor=GREY, hatch="///", label="16-bit (cell says why)")]


def precision_map_figure(pm: PrecisionMap):
    """One figure, two panels side by side: precision per cell (left) and its RTN error (right).

    Returned unsaved so tests (and callers wanting another format) can look at the axes.
    """
    plt = pyplot()
    rows, cols = max(1, len(pm.layers)), max(1, len(pm.modules))
    panel_w = 1.2 + 0.9 * cols
    # Constrained layout keeps the rotated ticks, legends below and the colorbar from overlapping.
    fig, (left, right) = plt.subplots(1, 2, figsize=(2 * panel_w + 1.0, max(3.0, 1.6 + 0.25 * rows)),
                                      layout="constrained")
    handles = _precision_panel(left, pm) + _error_panel(fig, right, pm)
    if handles:
        # A figure legend "outside" the axes: constrained layout reserves room for it below the tick labels,
        # where a per-axes legend would collide with the rotated module names or the neighbouring panel.
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    fig.suptitle("rtnq precision map")
    return fig


def precision_map_png(pm: PrecisionMap, path: str) -> None:
    """Draw the two-panel precision / RTN error figure into `path`."""
    plt = pyplot()
    fig = precision_map_figure(pm)
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
