"""Loss curves as a picture: training and validation loss, and the learning rate, against steps.

    python -m nanogpt_np.plot OUT_DIR [OUT_DIR ...] --out curve.svg [--title "..."]

Each run's `log.jsonl` holds one JSON object per line, appended by the trainer: every log_interval steps
{"type": "train", "step", "loss", "lr", ...} and every eval_interval steps {"type": "eval", "step",
"val_loss", ...}. This module reads them and writes one SVG file. SVG is XML text that lists shapes in pixel
coordinates (<line>, <path d="M x y L x y ...">, <circle>, <text>), so a chart needs no plotting library:
map each (step, value) to a pixel, join the pixels with a path, draw the axes and their labels.

The picture: a loss panel above a learning-rate panel, sharing the step axis. Each run has its own colour;
training loss is a solid line, validation loss a dashed line with a dot at each evaluation; the legend is on
the right. Several runs on one chart compare them (same axes). The server shows the same picture of the run
it serves (GET /loss.svg).
"""
import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from xml.sax.saxutils import escape, quoteattr

from .io.files import atomic_write_text

COLOURS = ["#1f63b5", "#d9480f", "#2b8a3e", "#862e9c", "#c92a2a", "#0b7285", "#e67700", "#495057"]
MAX_POINTS = 2000                    # per series: a long log is thinned so the file stays small


class PlotError(ValueError):
    """A run that cannot be plotted (no log, a corrupt line, nothing to draw): one line for the user."""


@dataclass
class Run:
    name: str
    train: list = field(default_factory=list)       # [(step, training loss)]
    val: list = field(default_factory=list)         # [(step, validation loss)]
    lr: list = field(default_factory=list)          # [(step, learning rate)]


# ---------------------------------------------------------------------------------------------------------
# Reading log.jsonl


def read_run(out_dir, name=None) -> Run:
    """The curves of one run. A record logged twice for the same step (a run resumed after a crash) counts
    once, the last one; a last line without its newline (the trainer was killed while writing it) is skipped."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.isdir(out_dir):
        raise PlotError(f"no run directory at {out_dir}")
    if not os.path.isfile(path):
        raise PlotError(f"{out_dir} has no log.jsonl (the trainer writes one as it trains)")
    train, val, lr = {}, {}, {}
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if not line.endswith("\n"):      # half of a record: the writer was stopped mid-line
                        break
                    raise PlotError(f"{path} line {number} is not valid JSON") from None
                step = record.get("step") if isinstance(record, dict) else None
                if not isinstance(step, int) or isinstance(step, bool):
                    raise PlotError(f"{path} line {number} is not a log record (it needs an integer 'step')")
                if record.get("type") == "train":
                    _keep(train, step, record.get("loss"))
                    _keep(lr, step, record.get("lr"))
                elif record.get("type") == "eval":
                    _keep(val, step, record.get("val_loss"))
    except UnicodeDecodeError:
        raise PlotError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise PlotError(f"cannot read {path}: {e.strerror or e}") from None
    if not train and not val:
        raise PlotError(f"{path} holds no training or validation losses yet")
    return Run(name or _run_name(out_dir), *(sorted(d.items()) for d in (train, val, lr)))


def _keep(points: dict, step, value):
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        points[step] = float(value)


def _run_name(out_dir):
    return os.path.basename(os.path.normpath(os.path.abspath(out_dir)))


def thin(points, max_points=MAX_POINTS):
    """At most about max_points of the points, evenly spaced, always keeping the last one."""
    if len(points) <= max_points:
        return points
    every = math.ceil(len(points) / max_points)
    return points[::every] + ([points[-1]] if (len(points) - 1) % every else [])


# ---------------------------------------------------------------------------------------------------------
# Axes


def nice_ticks(lo, hi, count=5):
    """Round values (1, 2 or 5 times a power of ten apart) inside lo..hi, about `count` of them.
    Returns (ticks, spacing)."""
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    spacing = min((m * power for m in (1, 2, 5, 10)), key=lambda s: abs(math.log(s / raw)))    # the nearest
    first = math.floor(lo / spacing + 1e-9) * spacing
    ticks = []
    k = 0
    while first + k * spacing <= hi + spacing * 1e-9:
        ticks.append(first + k * spacing)
        k += 1
    return [t for t in ticks if t >= lo - spacing * 1e-9], spacing


def tick_label(value, spacing, kind):
    if kind == "step":
        return f"{value:,.0f}"
    if kind == "lr":
        return "0" if value == 0 else f"{value:.3g}"
    decimals = max(0, -math.floor(math.log10(spacing) + 1e-9))
    return f"{value:.{decimals}f}"


class Panel:
    """A rectangle of the picture and the data ranges it shows: turns (step, value) into pixels."""

    def __init__(self, left, top, width, height, x_range, y_range):
        self.left, self.top, self.width, self.height = left, top, width, height
        self.x_lo, self.x_hi = x_range
        self.y_lo, self.y_hi = y_range

    def x(self, step):
        return self.left + (step - self.x_lo) / (self.x_hi - self.x_lo) * self.width

    def y(self, value):          # SVG's y grows downwards
        return self.top + (self.y_hi - value) / (self.y_hi - self.y_lo) * self.height

    def path(self, points):
        return " ".join(f"{'L' if i else 'M'}{self.x(s):.1f},{self.y(v):.1f}" for i, (s, v) in enumerate(points))


def _range(values, pad=0.05, floor=None):
    lo, hi = min(values), max(values)
    if hi == lo:
        hi, lo = hi + (abs(hi) * 0.1 or 1.0), lo - (abs(lo) * 0.1 or 1.0)
    margin = (hi - lo) * pad
    lo, hi = lo - margin, hi + margin
    if floor is not None:
        lo = max(lo, floor)
    return lo, hi


# ---------------------------------------------------------------------------------------------------------
# Drawing


def render_svg(runs, title=None) -> str:
    """The SVG text of a chart of the runs: the loss panel, and the learning-rate panel when the logs have one."""
    if not runs:
        raise PlotError("nothing to plot: give at least one run directory")
    runs = [Run(r.name, thin(r.train), thin(r.val), thin(r.lr)) for r in runs]
    has_lr = any(r.lr for r in runs)
    steps = [s for r in runs for s, _ in r.train + r.val + r.lr]
    x_range = (min(0, min(steps)), max(max(steps) * 1.02, 1))
    losses = [v for r in runs for _, v in r.train + r.val]

    left, plot_width, legend_width = 78, 560, 210
    width = left + plot_width + 20 + legend_width
    loss_top, loss_height = 50, 300
    lr_top, lr_height = loss_top + loss_height + 50, 110
    height = (lr_top + lr_height if has_lr else loss_top + loss_height) + 50

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="28" font-size="16" font-weight="bold">'
           f'{escape(title or "Loss: " + ", ".join(r.name for r in runs))}</text>']
    loss_panel = Panel(left, loss_top, plot_width, loss_height, x_range, _range(losses, floor=0))
    out += _axes(loss_panel, "loss", "loss", show_step_labels=not has_lr)
    for k, run in enumerate(runs):
        colour = COLOURS[k % len(COLOURS)]
        out += _series(loss_panel, run, "train", run.train, colour, dashed=False, dots=len(run.train) == 1)
        out += _series(loss_panel, run, "val", run.val, colour, dashed=True, dots=True)
    if has_lr:
        lr_panel = Panel(left, lr_top, plot_width, lr_height, x_range,
                         (0.0, max(v for r in runs for _, v in r.lr) * 1.08 or 1.0))     # from 0: a schedule's shape
        out += _axes(lr_panel, "learning rate", "lr", show_step_labels=True)
        for k, run in enumerate(runs):
            out += _series(lr_panel, run, "lr", run.lr, COLOURS[k % len(COLOURS)], dashed=False,
                           dots=len(run.lr) == 1)
    out += _legend(runs, left + plot_width + 20, loss_top, legend_width)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _axes(panel, label, kind, show_step_labels):
    """The frame, grid lines with their values, and the axis titles of one panel."""
    p = panel
    right, bottom = p.left + p.width, p.top + p.height
    out = [f'<rect x="{p.left}" y="{p.top}" width="{p.width}" height="{p.height}" fill="none" stroke="#868e96"/>']
    y_ticks, y_spacing = nice_ticks(p.y_lo, p.y_hi, 5 if p.height > 200 else 3)
    for value in y_ticks:
        y = p.y(value)
        out.append(f'<line x1="{p.left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#e9ecef"/>')
        out.append(f'<text x="{p.left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f'{tick_label(value, y_spacing, kind)}</text>')
    x_ticks, x_spacing = nice_ticks(p.x_lo, p.x_hi, 6)
    for step in x_ticks:
        x = p.x(step)
        out.append(f'<line x1="{x:.1f}" y1="{p.top}" x2="{x:.1f}" y2="{bottom}" stroke="#e9ecef"/>')
        if show_step_labels:
            out.append(f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">'
                       f'{tick_label(step, x_spacing, "step")}</text>')
    if show_step_labels:
        out.append(f'<text x="{p.left + p.width / 2:.1f}" y="{bottom + 36}" text-anchor="middle">step</text>')
    middle = p.top + p.height / 2
    out.append(f'<text x="18" y="{middle:.1f}" text-anchor="middle" transform="rotate(-90 18 {middle:.1f})">'
               f'{escape(label)}</text>')
    return out


def _series(panel, run, kind, points, colour, dashed, dots):
    """One line (an SVG path) for one series of one run, with a dot per point if asked."""
    if not points:
        return []
    dash = ' stroke-dasharray="6 4"' if dashed else ""
    out = [f'<path class="series" data-run={quoteattr(run.name)} data-series="{kind}" d="{panel.path(points)}" '
           f'fill="none" stroke="{colour}" stroke-width="{1.5 if kind == "lr" else 2}"{dash}/>']
    if dots:
        out += [f'<circle cx="{panel.x(s):.1f}" cy="{panel.y(v):.1f}" r="3" fill="{colour}"/>' for s, v in points]
    return out


def _legend(runs, left, top, width):
    out, y = [], top + 10
    for k, run in enumerate(runs):
        colour = COLOURS[k % len(COLOURS)]
        out.append(f'<line x1="{left}" y1="{y}" x2="{left + 24}" y2="{y}" stroke="{colour}" stroke-width="3"/>')
        name = run.name if len(run.name) <= 26 else run.name[:12] + "..." + run.name[-11:]
        out.append(f'<text x="{left + 32}" y="{y + 4}">{escape(name)}</text>')
        y += 20
    y += 10
    out.append(f'<line x1="{left}" y1="{y}" x2="{left + 24}" y2="{y}" stroke="#495057" stroke-width="2"/>')
    out.append(f'<text x="{left + 32}" y="{y + 4}">training loss</text>')
    y += 20
    out.append(f'<line x1="{left}" y1="{y}" x2="{left + 24}" y2="{y}" stroke="#495057" stroke-width="2" '
               f'stroke-dasharray="6 4"/>')
    out.append(f'<circle cx="{left + 12}" cy="{y}" r="3" fill="#495057"/>')
    out.append(f'<text x="{left + 32}" y="{y + 4}">validation loss</text>')
    if not any(r.val for r in runs):
        out.append(f'<text x="{left + 32}" y="{y + 20}" fill="#868e96">(none logged yet)</text>')
    return out


# ---------------------------------------------------------------------------------------------------------
# Command line


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):           # argparse would print the whole usage first
        self.exit(2, f"error: {message} (python -m nanogpt_np.plot -h)\n")


def build_parser():
    p = _OneLineParser(prog="python -m nanogpt_np.plot",
                       description="Draw training / validation loss and learning rate against steps from each "
                                   "run's log.jsonl to an SVG file (several runs on one chart).")
    p.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="run directories (each with a log.jsonl)")
    p.add_argument("--out", required=True, help="the SVG file to write, e.g. curve.svg")
    p.add_argument("--title", default=None, help="the chart's title (default: the runs' names)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not args.out.lower().endswith(".svg"):
            raise PlotError(f"--out must name an .svg file, got {args.out!r}")
        names = [_run_name(d) for d in args.out_dirs]
        runs = [read_run(d, name=d if names.count(n) > 1 else n) for d, n in zip(args.out_dirs, names)]
        svg = render_svg(runs, args.title)
        atomic_write_text(args.out, svg)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    points = sum(len(r.train) + len(r.val) for r in runs)
    print(f"wrote {args.out}: {len(runs)} run(s), {points} loss points", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
