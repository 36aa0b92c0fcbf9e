"""
blip2lora/curves.py: the training curves drawn in report.html.

The training curves at the top of report.html: the loss at every logged step, the learning rate, and val CIDEr at
every evaluation, read from out_dir/log.jsonl and drawn as inline SVG (no JavaScript, nothing to install).

A resumed run appends to log.jsonl from its checkpoint's step s: a {"step": s, "resumed": true} line says so, and
what the stopped run logged after step s is dropped here, so a resumed run draws the curve of an uninterrupted one.
"""
import html
import json
import math

CHARTS = (("loss", "training loss (mean caption-token cross-entropy)"), ("lr", "learning rate"),
          ("val_CIDEr", "val CIDEr (x100)"))
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 340, 220, 56, 14, 30, 40  # pixels: the chart and its margins


LARGEST = 1e30  # a logged value or step beyond this is no run's (a tampered or damaged line): skipped, and said


def read_log(path, skipped=None):
    """{"loss": [(step, value), ...], "lr": [...], "val_CIDEr": [...]}, continuous across resumes; lines that are not
    a log entry, or whose step or values no run logs, are skipped and counted in `skipped` (a list): the page is
    written whatever the log holds."""
    series = {key: {} for key, _ in CHARTS}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return {key: [] for key in series}
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or type(entry.get("step")) is not int:
            continue
        values = [entry[key] for key in series if type(entry.get(key)) in (int, float)]
        if not 0 <= entry["step"] <= LARGEST or any(abs(v) > LARGEST for v in values):
            if skipped is not None:
                skipped.append(line)
            continue
        if entry.get("resumed"):
            for points in series.values():  # logged by the stopped run after its last checkpoint: done again
                for step in [s for s in points if s > entry["step"]]:
                    del points[step]
        for key, points in series.items():
            value = entry.get(key)
            if type(value) in (int, float) and math.isfinite(value):
                points[entry["step"]] = float(value)
    return {key: sorted(points.items()) for key, points in series.items()}


def ticks(low, high, count=4):
    """About `count` round values (1, 2 or 5 times a power of ten apart) covering low..high."""
    span = high - low
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def chart(title, points):
    """One line chart as an <svg>: x the optimizer step, y the value, with round ticks on both axes."""
    steps, values = [s for s, _ in points], [v for _, v in points]
    x_low, x_high = min(0, steps[0]), max(steps[-1], 1)
    y_low, y_high = min(values), max(values)
    pad = (y_high - y_low) * 0.05 or abs(y_high) * 0.1 or 1.0  # a flat line still gets a y range
    y_low, y_high = y_low - pad, y_high + pad
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(step):
        return LEFT + (step - x_low) / (x_high - x_low) * inner_w

    def y(value):
        return TOP + (y_high - value) / (y_high - y_low) * inner_h
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' role='img' "
             f"aria-label='{html.escape(title)}'><text x='4' y='18' class='title'>{html.escape(title)}</text>",
             f"<rect x='{LEFT}' y='{TOP}' width='{inner_w}' height='{inner_h}' class='frame'/>"]
    for value in ticks(y_low, y_high):
        parts.append(f"<line x1='{LEFT}' x2='{LEFT + inner_w}' y1='{y(value):.1f}' y2='{y(value):.1f}' class='grid'/>"
                     f"<text x='{LEFT - 4}' y='{y(value) + 4:.1f}' text-anchor='end'>{value:.3g}</text>")
    for step in ticks(x_low, x_high):
        parts.append(f"<text x='{x(step):.1f}' y='{TOP + inner_h + 15}' text-anchor='middle'>{step:g}</text>")
    parts.append(f"<text x='{LEFT + inner_w / 2}' y='{HEIGHT - 6}' text-anchor='middle'>optimizer step</text>")
    line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
    parts.append(f"<polyline points='{line}' class='line'/>")
    if len(points) <= 30:  # few points (evaluations): each one marked
        parts += [f"<circle cx='{x(s):.1f}' cy='{y(v):.1f}' r='3'/>" for s, v in points]
    return "".join(parts) + "</svg>"


def curves_html(log_path):
    """The report's "Training" section from log.jsonl; "" when the log holds no step."""
    skipped = []
    series = read_log(log_path, skipped)
    drawn = [chart(title, series[key]) for key, title in CHARTS if series[key]]
    if not drawn:
        return ""
    last = max(points[-1][0] for points in series.values() if points)
    said = f" {len(skipped)} lines with a step or value no run logs were left out." if skipped else ""
    return (f"<h2>Training</h2><p>From {html.escape(str(log_path))}: {len(series['loss'])} logged steps up to step "
            f"{last}, {len(series['val_CIDEr'])} evaluations.{said}</p><div class='curves'>" + "".join(drawn)
            + "</div>")


CSS = (".curves{display:flex;flex-wrap:wrap;gap:12px}.curves svg{font-size:11px}.curves .title{font-weight:bold;"
       "font-size:12px}.curves .frame{fill:none;stroke:#999}.curves .grid{stroke:#e4e4e4}.curves .line{fill:none;"
       "stroke:#1f5fa8;stroke-width:1.8}.curves circle{fill:#1f5fa8}")
