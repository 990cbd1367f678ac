"""python -m nanogpt_np.plot: log.jsonl -> an SVG chart of training / validation loss and learning rate."""
import json
import math
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from nanogpt_np.config import parse_args
from nanogpt_np.plot import MAX_POINTS, PlotError, main, nice_ticks, read_run, render_svg, thin
from nanogpt_np.trainer import train

REPO = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("plot") / "run"
    train(parse_args(["--model=tiny", "--block_size=16", "--batch_size=4", "--eval_iters=1", "--device=cpu",
                      "--max_iters=20", "--lr_decay_iters=20", "--warmup_iters=5", "--eval_interval=10",
                      "--log_interval=2", f"--out_dir={out}"]), echo=lambda *a: None)
    return out


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def series(svg_text):
    """{(run, series): [(x, y) pixels]} of the chart's series paths (the SVG must parse as XML)."""
    root = ET.fromstring(svg_text)
    assert root.tag == SVG + "svg"
    out = {}
    for path in root.iter(SVG + "path"):
        if path.get("class") == "series":
            points = [tuple(map(float, p)) for p in re.findall(r"[ML]([-\d.]+),([-\d.]+)", path.get("d"))]
            out[(path.get("data-run"), path.get("data-series"))] = points
    return out


def write_log(directory, lines):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "log.jsonl").write_text("".join(line + "\n" for line in lines))
    return directory


def test_a_trained_run_gives_one_path_per_series_through_its_records(run_dir):
    log = records(run_dir / "log.jsonl")
    train_points = [(r["step"], r["loss"]) for r in log if r["type"] == "train"]
    val_points = [(r["step"], r["val_loss"]) for r in log if r["type"] == "eval"]
    run = read_run(run_dir)
    assert run.name == "run" and run.train == train_points and run.val == val_points
    assert run.lr == [(r["step"], r["lr"]) for r in log if r["type"] == "train"]
    paths = series(render_svg([run]))
    assert set(paths) == {("run", "train"), ("run", "val"), ("run", "lr")}
    for kind, points in (("train", train_points), ("val", val_points)):
        pixels = paths[("run", kind)]
        assert len(pixels) == len(points)
        xs = [x for x, _ in pixels]
        assert xs == sorted(xs) and len(set(xs)) == len(xs)                  # steps go left to right
        # a higher loss is drawn higher up (a smaller y), in proportion
        ys, losses = [y for _, y in pixels], [v for _, v in points]
        for (y1, l1), (y2, l2) in zip(zip(ys, losses), zip(ys[1:], losses[1:])):
            assert (y2 - y1) * (l2 - l1) <= 0
    # the same steps of the two series share pixels on the step axis
    shared = dict(zip([s for s, _ in train_points], [x for x, _ in paths[("run", "train")]]))
    for (step, _), (x, _) in zip(val_points, paths[("run", "val")]):
        assert x == pytest.approx(shared[step], abs=0.06)


def test_several_runs_on_one_chart(run_dir, tmp_path):
    other = write_log(tmp_path / "other", [json.dumps({"type": "train", "step": s, "loss": 5 - s / 10, "lr": 1e-3})
                                           for s in range(0, 40, 4)])
    out = tmp_path / "both.svg"
    assert main([str(run_dir), str(other), "--out", str(out), "--title", "A & B"]) == 0
    text = out.read_text()
    paths = series(text)
    assert set(paths) == {("run", "train"), ("run", "val"), ("run", "lr"), ("other", "train"), ("other", "lr")}
    root = ET.fromstring(text)
    colours = {p.get("data-run"): p.get("stroke") for p in root.iter(SVG + "path")}
    assert colours["run"] != colours["other"]
    labels = [t.text for t in root.iter(SVG + "text")]
    assert "A & B" in labels and "run" in labels and "other" in labels and "step" in labels
    assert "training loss" in labels and "validation loss" in labels and "learning rate" in labels


def test_a_log_without_validation_records(tmp_path):
    run_dir = write_log(tmp_path / "noval", [json.dumps({"type": "train", "step": s, "loss": 3.0 / (s + 1),
                                                         "lr": 6e-4}) for s in range(1, 6)])
    text = render_svg([read_run(run_dir)])
    assert set(series(text)) == {("noval", "train"), ("noval", "lr")}
    assert "(none logged yet)" in text


def test_a_log_without_learning_rates_has_no_lr_panel(tmp_path):
    run_dir = write_log(tmp_path / "nolr", [json.dumps({"type": "eval", "step": 5, "val_loss": 2.0})])
    text = render_svg([read_run(run_dir)])
    assert set(series(text)) == {("nolr", "val")} and "learning rate" not in text


def test_resumed_and_half_written_logs(tmp_path):
    """A step logged twice counts once (the last record); a last line cut short by a kill is skipped."""
    lines = [json.dumps({"type": "train", "step": s, "loss": 1.0, "lr": 1e-3}) for s in (1, 2, 3)]
    lines.append(json.dumps({"type": "train", "step": 2, "loss": 0.5, "lr": 1e-3}))
    run_dir = write_log(tmp_path / "r", lines)
    with open(run_dir / "log.jsonl", "a") as f:
        f.write('{"type": "train", "step": 4, "lo')
    assert read_run(run_dir).train == [(1, 1.0), (2, 0.5), (3, 1.0)]


@pytest.mark.parametrize("setup,message", [
    (lambda d: None, "no run directory at"),
    (lambda d: d.mkdir(), "has no log.jsonl"),
    (lambda d: write_log(d, []), "holds no training or validation losses"),
    (lambda d: write_log(d, ['{"type": "train", "step": 1, "loss": 2}', "{oops", "{}"]), "line 2 is not valid JSON"),
    (lambda d: write_log(d, ["[1, 2]"]), "line 1 is not a log record"),
    (lambda d: write_log(d, ['{"type": "train", "step": "3", "loss": 2}']), "line 1 is not a log record"),
    (lambda d: (d.mkdir(), (d / "log.jsonl").write_bytes(b"\xff\xfe\n")), "is not UTF-8 text"),
])
def test_bad_runs_are_refused_in_one_line(tmp_path, setup, message):
    run_dir = tmp_path / "bad"
    setup(run_dir)
    r = subprocess.run([sys.executable, "-m", "nanogpt_np.plot", str(run_dir), "--out", str(tmp_path / "c.svg")],
                       capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "c.svg").exists()


@pytest.mark.parametrize("argv,message", [
    ([], "the following arguments are required"),
    (["RUN"], "--out"),
    (["RUN", "--bogus", "1", "--out", "c.svg"], "unrecognized arguments"),
    (["RUN", "--out", "curve.png"], "--out must name an .svg file"),
    (["RUN", "--out", "A_FILE/curve.svg"], "cannot write"),                   # a folder that is a file
])
def test_bad_command_lines_are_refused_in_one_line(run_dir, tmp_path, capsys, argv, message):
    (tmp_path / "a_file").write_text("")
    argv = [str(run_dir) if a == "RUN" else a.replace("A_FILE", str(tmp_path / "a_file")) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:          # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_thin_and_ticks():
    points = [(s, float(s)) for s in range(10_001)]
    thinned = thin(points)
    assert len(thinned) <= MAX_POINTS + 1 and thinned[0] == points[0] and thinned[-1] == points[-1]
    assert thin(points[:50]) == points[:50]
    for lo, hi in ((0, 1), (2.21, 4.73), (0, 0.00061), (0, 123_456), (-3, 7)):
        ticks, spacing = nice_ticks(lo, hi)
        mantissa = spacing / 10 ** math.floor(math.log10(spacing))
        assert round(mantissa, 6) in (1, 2, 5, 10)
        assert all(lo - 1e-12 <= t <= hi + 1e-12 for t in ticks) and 3 <= len(ticks) <= 11


def test_plot_refuses_nothing_to_draw():
    with pytest.raises(PlotError):
        render_svg([])
