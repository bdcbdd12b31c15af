"""Pipeline timelines as pictures: one row per rank, one box per action.

A chart is built from `Box`es, which can come from the schedule simulator
(`boxes_from_simulation`) or from timings measured in a real run, so the two
can be drawn one above the other with `draw_pipeline` and compared by eye.
Matplotlib is imported only when drawing, and only its object API is used (no
pyplot), so drawing touches no global backend state and needs no display.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from plait.parallel.schedule import Simulation


@dataclass(frozen=True)
class Box:
    """One span of time on one rank.

    `start` and `end` are seconds for measured timelines, or the simulator's
    time units; all boxes of a panel share one origin (e.g. the step's start).
    `kind` is "F", "B", "I", "W" (a backward split into its input and weight
    gradients), "wait", "send", "allreduce", "optimizer", "checkpoint" or any
    other word (drawn in a grey of its own). `label` is drawn inside the
    box when it fits: the micro-batch, or "stage:micro-batch" when a rank holds
    several stages (cut to the micro-batch, across the panel, where that is
    all that fits). `chunk` is the virtual-stage chunk (stage // pp) of a
    compute box; each chunk gets its own shade.
    """

    rank: int
    start: float
    end: float
    kind: str
    label: str = ""
    chunk: int = 0


def boxes_from_simulation(sim: Simulation, virtual: int = 1) -> list[Box]:
    """One box per simulated action (F, B, I or W, each its own colour), at the simulator's times (in units).

    With `virtual` > 1 a rank holds several stages, so labels name the stage
    too ("5:3" is stage 5, micro-batch 3). The chunk is stage // pp in either
    layout: chunk 0 is stages 0..pp-1, whether chunk 1 loops (zbv's V does not).
    """
    pp = len(sim.timeline)
    boxes = []
    for rank in sorted(sim.timeline):
        for start, end, a in sim.timeline[rank]:
            label = f"{a.stage}:{a.microbatch}" if virtual > 1 else str(a.microbatch)
            boxes.append(Box(rank, start, end, a.kind, label, chunk=a.stage // pp))
    return boxes


# Okabe-Ito colours, distinguishable with the common colour-vision deficiencies:
# blue forwards against vermillion backwards carries the chart; a split backward
# keeps the warm side, orange for the input gradient that the previous stage waits
# for and yellow for the weight gradients that fill the gaps; the rest is muted.
_COMPUTE = {"F": "#0072B2", "B": "#D55E00", "I": "#E69F00", "W": "#F0E442"}
_OTHER = {
    "wait": "#e4e4e4",
    "send": "#a8a8a8",
    "allreduce": "#009E73",
    "optimizer": "#CC79A7",
    "checkpoint": "#6e6e6e",
}
_SPARE_GREYS = ("#c8c8c8", "#8c8c8c", "#5a5a5a", "#d8d8d8")
_NAMES = {"F": "forward", "B": "backward", "I": "input gradient", "W": "weight gradient", "allreduce": "all-reduce"}
_UNITS = {"s": (1000.0, "time (ms)"), "ms": (1.0, "time (ms)"), "units": (1.0, "time (units)")}

Panel = Union[tuple[str, Sequence[Box]], tuple[str, Sequence[Box], str]]


def _mix(colour: str, weight: float) -> str:
    """`colour` moved `weight` (0..1) of the way towards white."""
    from matplotlib.colors import to_hex, to_rgb

    return to_hex([c + (1.0 - c) * weight for c in to_rgb(colour)])


def _text_colour(fill: str) -> str:
    """Black or white, whichever reads better on `fill` (by relative luminance)."""
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(fill)
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "white"


def _colour(box: Box, chunks: int, spare: dict[str, str]) -> str:
    if box.kind in _COMPUTE:
        # Later chunks lighter, but never so light that they read as idle time.
        return _mix(_COMPUTE[box.kind], 0.5 * box.chunk / max(chunks - 1, 1))
    if box.kind in _OTHER:
        return _OTHER[box.kind]
    if box.kind not in spare:
        spare[box.kind] = _SPARE_GREYS[len(spare) % len(_SPARE_GREYS)]
    return spare[box.kind]


def _legend_name(kind: str, chunk: int, chunks: int, num_ranks: int) -> str:
    name = _NAMES.get(kind, kind)
    if kind not in _COMPUTE or chunks == 1:
        return name
    first = chunk * num_ranks  # rank r holds stages r, r+pp, ...: chunk c is stages c*pp .. c*pp+pp-1
    return f"{name}, stages {first}-{first + num_ranks - 1}"


def draw_pipeline(panels: Sequence[Panel], out: str | Path, title: str, num_ranks: int,
                  row_labels: Sequence[str] | None = None):
    """Draw pipeline timelines into a PNG at `out`, written whole or not at all; returns the Figure.

    `panels` are drawn top to bottom (e.g. measured over simulated), each a
    tuple (name, boxes) or (name, boxes, unit). The unit says what box times
    are in: "s" (drawn in milliseconds), "ms", or "units" (simulator time, the
    default). Each panel has one row per rank, row 0 on top, time running
    right; idle time is left white. `row_labels` name the rows (default
    "rank 0", "rank 1", ...: a box's `rank` is its row). Raises ValueError on
    an unknown unit.

    It scales to thousands of actions (64 stages x 512 micro-batches): each
    row is one collection of rectangles, not one artist per box, and a label
    is made only for a box it fits in, measured once per distinct text.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
    from matplotlib.patches import Patch

    norm = []
    for panel in panels:
        name, boxes, unit = (*panel, "units") if len(panel) == 2 else panel
        if unit not in _UNITS:
            raise ValueError(f"panel {name!r}: unknown unit {unit!r}; use one of {', '.join(_UNITS)}")
        norm.append((name, list(boxes), unit))
    if not norm:
        raise ValueError("draw_pipeline needs at least one panel")
    if row_labels is None:
        row_labels = [f"rank {r}" for r in range(num_ranks)]
    if len(row_labels) != num_ranks:
        raise ValueError(f"{len(row_labels)} row labels for {num_ranks} rows")
    chunks = max((b.chunk + 1 for _, boxes, _ in norm for b in boxes if b.kind in _COMPUTE), default=1)

    row_in = 0.34  # inches per rank: room for a label in 8 pt text
    heights = [num_ranks * row_in + 0.75 for _ in norm]
    fig = Figure(figsize=(10, sum(heights) + 1.0), dpi=120, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(len(norm), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]

    legend: dict[tuple[int, str, int], tuple[str, str]] = {}  # (order, kind, chunk) -> (name, colour)
    order = {k: i for i, k in enumerate([*_COMPUTE, *_OTHER])}
    spare: dict[str, str] = {}
    colours: dict[tuple[str, int], str] = {}  # (kind, chunk) -> fill, worked out once, not per box
    rows_of = []  # per panel: the row collections and each box's (left, width, row, label, fill) in data units
    for ax, (name, boxes, unit) in zip(axes, norm):
        scale, xlabel = _UNITS[unit]
        spans: dict[int, list] = {}
        for box in boxes:
            key = (box.kind, box.chunk)
            if key not in colours:
                colours[key] = _colour(box, chunks, spare)
                legend.setdefault((order.get(box.kind, len(order)), box.kind,
                                   box.chunk if box.kind in _COMPUTE else 0),
                                  (_legend_name(box.kind, box.chunk, chunks, num_ranks), colours[key]))
            left, width = box.start * scale, max(box.end - box.start, 0.0) * scale
            spans.setdefault(box.rank, []).append((left, width, box.label, colours[key]))
        # One collection per row: a Rectangle (and a BarContainer) per box made
        # 64 x 512 x 2 boxes take over a minute. A white edge keeps back-to-back
        # boxes apart without a dark outline (dropped below where boxes are slivers).
        collections = [ax.broken_barh([(lft, w) for lft, w, _, _ in row], (rank - 0.39, 0.78),
                                      facecolors=[fill for *_, fill in row], edgecolor="white", linewidth=0.8)
                       for rank, row in sorted(spans.items())]
        rows_of.append((collections, spans))
        end = max((b.end * scale for b in boxes), default=1.0)
        start = min([0.0, *(b.start * scale for b in boxes)])
        ax.set_xlim(start, end + (end - start) * 0.01)
        ax.set_ylim(num_ranks - 0.5, -0.5)  # row 0 on top, as pipeline diagrams are read
        ax.set_yticks(range(num_ranks), list(row_labels))
        ax.tick_params(axis="y", length=0)
        ax.set_xlabel(xlabel)
        ax.set_title(name, loc="left", fontsize=10)
        ax.grid(axis="x", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        if not boxes:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")

    fig.suptitle(title, fontsize=11)
    handles = [Patch(facecolor=c, label=n) for _, (n, c) in sorted(legend.items())]
    handles.append(Patch(facecolor="white", edgecolor="#999999", linewidth=0.6, label="idle"))
    # One row while the names fit the figure's width (about 120 characters at 8.5 pt with each
    # swatch), else two: zbv's six chunk-and-kind names ran off both edges in one.
    one_row = len(handles) <= 8 and sum(len(h.get_label()) + 6 for h in handles) <= 120
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles) if one_row else -(-len(handles) // 2),
               frameon=False, fontsize=8.5)

    # Whether a label fits is known only once the layout has placed the axes.
    fig.draw_without_rendering()  # the layout, without rasterising thousands of boxes once more
    renderer = canvas.get_renderer()
    font = FontProperties(size=7.5)
    text_width: dict[str, float] = {}

    def fits(label: str, room: float) -> bool:
        if label not in text_width:
            text_width[label] = renderer.get_text_width_height_descent(label, font, ismath=False)[0]
        return text_width[label] <= room - 2

    for ax, (collections, spans) in zip(axes, rows_of):
        px = ax.transData.transform((1.0, 0.0))[0] - ax.transData.transform((0.0, 0.0))[0]  # pixels per unit
        widths = sorted(w * px for row in spans.values() for _, w, _, _ in row)
        if widths and widths[len(widths) // 2] < 4:  # most boxes are slivers: white edges would hide them
            for c in collections:
                c.set_linewidth(0)
        labelled = [(lft, w, rank, label, fill) for rank, row in spans.items() for lft, w, label, fill in row
                    if label and w * px > 4]  # narrower than any text: not even measured
        # Interleaved forwards are narrow. The shade already names the chunk,
        # so if any "stage:micro-batch" label is too wide, the whole panel
        # shows micro-batches alone rather than a mix of the two styles.
        if any(":" in label and not fits(label, w * px) for _, w, _, label, _ in labelled):
            labelled = [(lft, w, rank, label.rpartition(":")[2], fill) for lft, w, rank, label, fill in labelled]
        for lft, w, rank, label, fill in labelled:
            if fits(label, w * px):
                ax.text(lft + w / 2, rank, label, ha="center", va="center", fontsize=7.5,
                        color=_text_colour(fill), clip_on=True)

    out = Path(out)
    tmp = out.with_name(out.stem + ".tmp.png")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return fig
