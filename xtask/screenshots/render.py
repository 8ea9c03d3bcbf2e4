"""Draws a Grafana dashboard's panels from live Prometheus data, as one PNG.

Grafana itself cannot run on the machines gopulse is built on, so this reads
the dashboard JSON (dashboards/*.json), runs each panel's own PromQL against
a Prometheus the way Grafana would with every variable at "All", and draws
the panels in their gridPos layout in the colours of Grafana's dark theme:
timeseries (lines, table legend with Last * and Max), stat (big number over
a sparkline), table (instant values), heatmap (de-accumulated le buckets).

    render.py --prometheus 127.0.0.1:9090 --start UNIX --end UNIX \
              --out-dir docs/img dashboards/gopulse-fleet.json ...

`cargo xtask screenshots` runs it; see docs/dashboards.md.
"""
import argparse
import json
import math
import re
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display here
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

# Grafana's dark theme (canvas, panel, border, text) and its classic palette.
CANVAS, PANEL, BORDER = "#111217", "#181b1f", "#2c2f35"
TEXT, DIM, GRID, HEADER = "#ccccdc", "#8e8e99", "#26282d", "#6e9fff"
PALETTE = ["#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2",
           "#B877D9", "#705DA0", "#37872D", "#FADE2A", "#447EBC", "#C15C17"]
GREEN, RED = "#73BF69", "#F2495C"  # a stat's default thresholds: base, >= 80

# Grafana's grid: 24 columns, rows of 30 px with 8 px between panels.
WIDTH, ROW, GAP, TOP = 1800, 30, 8, 70
DPI = 100


def px(n):
    """Pixels to points, for font sizes and line widths."""
    return n * 72 / DPI


# ---- Prometheus --------------------------------------------------------------

class Prom:
    def __init__(self, addr, start, end, rate_interval):
        self.addr, self.start, self.end = addr, start, end
        self.rate_interval = rate_interval
        # Grafana asks for about one point per pixel or two, never finer
        # than the 1 s scrape.
        self.step = max(1, math.ceil((end - start) / 400))

    def promql(self, expr):
        """The query as Grafana sends it with every variable at "All"."""
        q = expr.replace("$__rate_interval", f"{self.rate_interval}s")
        q = q.replace("$__range", f"{self.end - self.start}s")
        for var in ("namespace", "pod", "exe", "pid"):
            q = q.replace(f"${var}", ".*")
        if "$" in q:
            raise SystemExit(f"unknown variable in {expr}")
        return q

    def api(self, path, **params):
        url = f"http://{self.addr}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise SystemExit(f"{url}: {body}")
        return body["data"]["result"]

    def range(self, expr, step=None):
        return self.api("/api/v1/query_range", query=self.promql(expr),
                        start=self.start, end=self.end, step=step or self.step)

    def instant(self, expr):
        return self.api("/api/v1/query", query=self.promql(expr), time=self.end)


# ---- Grafana's units and legends ---------------------------------------------

def number(v, max_decimals=2):
    """A number with as few decimals as its size needs (Grafana's "auto")."""
    if v == 0 or abs(v) >= 100 or float(v).is_integer():
        return f"{v:.0f}"
    decimals = min(max_decimals + 1, max(0, 2 - int(math.floor(math.log10(abs(v))))))
    return f"{v:.{decimals}f}".rstrip("0").rstrip(".")


def fmt(v, unit):
    """Grafana's formatting of the units the boards use."""
    if v is None or math.isnan(v):
        return "-"
    if unit == "s":
        for scale, suffix in ((1, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns")):
            if abs(v) >= scale or scale == 1e-9:
                return f"{number(v / scale)} {suffix}" if v else "0 s"
    if unit == "percentunit":
        return f"{number(v * 100)}%"
    if unit == "bytes":  # IEC
        for scale, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B")):
            if abs(v) >= scale or scale == 1:
                return f"{number(v / scale)} {suffix}"
    if unit == "Bps":  # SI
        for scale, suffix in ((1e9, "GB/s"), (1e6, "MB/s"), (1e3, "kB/s"), (1, "B/s")):
            if abs(v) >= scale or scale == 1:
                return f"{number(v / scale)} {suffix}"
    if unit == "ops":  # SI-scaled count per second
        for scale, suffix in ((1e9, " Bil"), (1e6, " Mil"), (1e3, "K"), (1, "")):
            if abs(v) >= scale or scale == 1:
                return f"{number(v / scale)}{suffix} ops/s"
    return number(v)  # "none": the plain number, unscaled


def legend(fmt_str, labels):
    """legendFormat with {{label}} filled in; a missing label is empty, as in
    Grafana's backend, and an empty result falls back to the labels."""
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt_str)
    text = " ".join(text.split())
    return text or "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


# ---- Drawing -----------------------------------------------------------------

class Canvas:
    """A figure addressed in Grafana's pixels (origin top left)."""

    def __init__(self, rows):
        self.h = TOP + rows * (ROW + GAP) + GAP
        self.fig = plt.figure(figsize=(WIDTH / DPI, self.h / DPI), dpi=DPI, facecolor=CANVAS)

    def rect(self, x, y, w, h):
        return [x / WIDTH, 1 - (y + h) / self.h, w / WIDTH, h / self.h]

    def axes(self, x, y, w, h):
        ax = self.fig.add_axes(self.rect(x, y, w, h))
        ax.set_facecolor("none")
        return ax

    def text(self, x, y, s, **kw):
        self.fig.text(x / WIDTH, 1 - y / self.h, s, color=kw.pop("color", TEXT), **kw)


def style(ax, unit):
    """Axes the way a Grafana timeseries draws them: faint grid, no frame."""
    for side in ax.spines.values():
        side.set_visible(False)
    ax.tick_params(colors=DIM, labelsize=px(11), length=0)
    ax.grid(True, color=GRID, linewidth=1)
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v, unit)))
    locator = mdates.AutoDateLocator(minticks=4, maxticks=8)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))


def place(cv, ax, unit, x, y, w, h):
    """Puts the plot in its box leaving room for its y labels, as Grafana
    sizes the axis to its widest label."""
    lo, hi = ax.get_ylim()
    labels = [fmt(t, unit) for t in ax.get_yticks() if lo <= t <= hi] or [""]
    margin = 14 + 7 * max(len(s) for s in labels)
    ax.set_position(cv.rect(x + margin, y, w - margin - 12, h))


def points(values, step):
    """Times and values of a range result, with a NaN (a gap in the line)
    where points are missing, e.g. after a failed scrape, as Grafana does."""
    ts, vs, last = [], [], None
    for t, v in values:
        if last is not None and t - last > 1.5 * step:
            ts.append(datetime.fromtimestamp(last + step))
            vs.append(math.nan)
        ts.append(datetime.fromtimestamp(t))
        vs.append(float(v))
        last = t
    return ts, vs


def draw_timeseries(cv, panel, prom, x, y, w, h):
    unit = panel["fieldConfig"]["defaults"]["unit"]
    series = []  # (name, times, values), in query then result order
    for target in panel["targets"]:
        for r in prom.range(target["expr"]):
            ts, vals = points(r["values"], prom.step)
            series.append((legend(target["legendFormat"], r["metric"]), ts, vals))
    if not series:
        return no_data(cv, x, y, w, h)
    # Legend as a table under the plot (displayMode "table", calcs lastNotNull
    # and max); rows past what fits are summed up, as Grafana would scroll.
    row_h = 19
    fit = max(1, int(h * 0.45 / row_h) - 1)
    shown = series[: fit if len(series) > fit + 1 else fit + 1]
    legend_h = (len(shown) + 1 + (len(shown) < len(series))) * row_h
    ax = cv.axes(x, y, w, h - legend_h - 20)
    style(ax, unit)
    for i, (_, ts, vals) in enumerate(series):
        ax.plot(ts, vals, color=PALETTE[i % len(PALETTE)], linewidth=px(1.5))
    ax.set_xlim(datetime.fromtimestamp(prom.start), datetime.fromtimestamp(prom.end))
    ax.set_ylim(bottom=min(0, ax.get_ylim()[0]))
    place(cv, ax, unit, x, y, w, h - legend_h - 20)
    top = y + h - legend_h
    cols = (x + w - 180, x + w - 20)  # right edges of "Last *" and "Max"
    cv.text(cols[0], top + 12, "Last *", color=HEADER, fontsize=px(12), ha="right")
    cv.text(cols[1], top + 12, "Max", color=HEADER, fontsize=px(12), ha="right")
    for i, (name, _, vals) in enumerate(shown):
        ty = top + 12 + (i + 1) * row_h
        cv.text(x + 12, ty, "\u2014", color=PALETTE[i % len(PALETTE)], fontsize=px(14),
                fontweight="bold")
        cv.text(x + 34, ty, name[:90], fontsize=px(12))
        # lastNotNull and max skip the NaNs (gaps) of, e.g., a quantile of
        # an empty window.
        real = [v for v in vals if not math.isnan(v)] or [math.nan]
        cv.text(cols[0], ty, fmt(real[-1], unit), fontsize=px(12), ha="right")
        cv.text(cols[1], ty, fmt(max(real), unit), fontsize=px(12), ha="right")
    if len(shown) < len(series):
        cv.text(x + 34, top + 12 + (len(shown) + 1) * row_h,
                f"... {len(series) - len(shown)} more series", color=DIM, fontsize=px(12))


def draw_stat(cv, panel, prom, x, y, w, h):
    unit = panel["fieldConfig"]["defaults"]["unit"]
    # Like Grafana: a range query (the target is not "instant"), reduced with
    # lastNotNull, so one failed scrape at the end does not blank the panel.
    result = prom.range(panel["targets"][0]["expr"])
    ts, vals = points(result[0]["values"], prom.step) if result else ([], [])
    real = [v for v in vals if not math.isnan(v)]
    if not real:
        return no_data(cv, x, y, w, h)
    value = real[-1]
    color = RED if value >= 80 else GREEN
    # graphMode "area": the series, faint, behind the number.
    ax = cv.axes(x, y + h * 0.45, w, h * 0.55)
    ax.axis("off")
    ax.fill_between(ts, vals, color=color, alpha=0.18, linewidth=0)
    ax.plot(ts, vals, color=color, alpha=0.6, linewidth=px(1.5))
    lo, hi = min(real), max(real)
    ax.set_ylim(min(0, lo), hi + (hi - lo or 1) * 0.15)
    ax.set_xlim(ts[0], ts[-1])
    cv.text(x + w / 2, y + h * 0.62, fmt(value, unit), color=color, fontsize=px(44),
            fontweight="bold", ha="center", va="center")


def draw_table(cv, panel, prom, x, y, w, h):
    unit = panel["fieldConfig"]["defaults"]["unit"]
    rows = [(r["metric"], float(r["value"][1]))
            for t in panel["targets"] for r in prom.instant(t["expr"])]
    if not rows:
        return no_data(cv, x, y, w, h)
    rows.sort(key=lambda r: -r[1])  # sortBy Value, descending
    # format "table": one column per label, then Value (Time is hidden).
    labels = sorted({k for m, _ in rows for k in m})
    row_h, top = 30, y + 14
    col_w = (w - 140) / max(1, len(labels))
    for j, name in enumerate(labels + ["Value"]):
        cx = x + w - 16 if name == "Value" else x + 12 + j * col_w
        cv.text(cx, top, name, color=HEADER, fontsize=px(12), fontweight="bold",
                ha="right" if name == "Value" else "left")
    fit = int((y + h - top) / row_h) - 1
    for i, (metric, value) in enumerate(rows[:fit]):
        ty = top + (i + 1) * row_h
        cv.fig.add_artist(plt.Line2D([(x + 4) / WIDTH, (x + w - 4) / WIDTH],
                                     [1 - (ty - 19) / cv.h] * 2, color=BORDER, linewidth=1))
        for j, name in enumerate(labels):
            cv.text(x + 12 + j * col_w, ty, metric.get(name, ""), fontsize=px(12))
        cv.text(x + w - 16, ty, fmt(value, unit), fontsize=px(12), ha="right")


def draw_heatmap(cv, panel, prom, x, y, w, h):
    unit = panel["fieldConfig"]["defaults"]["unit"]
    # Same step as the other panels: as in Grafana, each cell holds the
    # increase over the $__rate_interval that ends at it.
    result = prom.range(panel["targets"][0]["expr"])
    if not result:
        return no_data(cv, x, y, w, h)
    les = sorted({float(r["metric"]["le"]) for r in result})
    by_le = {float(r["metric"]["le"]): dict(r["values"]) for r in result}
    stamps = sorted({t for r in result for t, _ in r["values"]})
    # format "heatmap": cumulative le buckets become counts per bucket;
    # empty cells are hidden (Grafana's default filter, <= 1e-9).
    cells = []
    for t in stamps:
        cum = [float(by_le[le].get(t, 0)) for le in les]
        cells.append([c - (cum[i - 1] if i else 0) for i, c in enumerate(cum)])
    rows = [[v if v > 1e-9 else math.nan for v in row] for row in zip(*cells)]
    edges = [datetime.fromtimestamp(float(stamps[0]) - prom.step)] + \
        [datetime.fromtimestamp(float(t)) for t in stamps]
    ax = cv.axes(x, y + 4, w, h - 28)
    style(ax, unit)
    ax.grid(False)
    # "Oranges" at exponent 0.5, which Grafana reverses on its dark theme.
    mesh = ax.pcolormesh(edges, range(len(les) + 1), rows, cmap="Oranges_r",
                         norm=PowerNorm(0.5), edgecolors="none")
    # The le buckets as equal rows, each edge labelled with its bound.
    ax.set_yticks(range(len(les) + 1))
    ax.set_yticklabels(["0"] + [("+Inf" if math.isinf(le) else fmt(le, unit)) for le in les])
    ax.set_xlim(datetime.fromtimestamp(prom.start), datetime.fromtimestamp(prom.end))
    ax.set_position(cv.rect(x + 60, y + 4, w - 130, h - 28))
    bar = cv.axes(x + w - 56, y + 4, 10, h - 28)
    cv.fig.colorbar(mesh, cax=bar).outline.set_visible(False)
    bar.tick_params(colors=DIM, labelsize=px(10), length=0)


def no_data(cv, x, y, w, h):
    cv.text(x + w / 2, y + h / 2, "No data", color=DIM, fontsize=px(16), ha="center", va="center")


DRAW = {"timeseries": draw_timeseries, "stat": draw_stat, "table": draw_table,
        "heatmap": draw_heatmap}


def render(board_file, prom, out_dir):
    board = json.loads(Path(board_file).read_text())
    panels = board["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    cv = Canvas(rows)
    # The dashboard's header: title, variables at All, time range.
    cv.text(16, 30, board["title"], fontsize=px(20), va="center")
    chips = ["Prometheus"] + [f'{v["name"]}: All' for v in board["templating"]["list"][1:]]
    cv.text(16, 56, "     ".join(chips), color=DIM, fontsize=px(12), va="center")
    end = datetime.fromtimestamp(prom.end).astimezone()
    span = f"{datetime.fromtimestamp(prom.start):%Y-%m-%d %H:%M:%S} to {end:%H:%M:%S %Z}"
    cv.text(WIDTH - 16, 30, span, color=DIM, fontsize=px(12), ha="right", va="center")
    col = (WIDTH - GAP) / 24
    for p in panels:
        g = p["gridPos"]
        x, y = GAP + g["x"] * col, TOP + g["y"] * (ROW + GAP)
        w, h = g["w"] * col - GAP, g["h"] * ROW + (g["h"] - 1) * GAP
        if p["type"] == "row":  # a header across the board, no panel
            cv.text(x, y + h / 2, p["title"], fontsize=px(14), fontweight="bold", va="center")
            continue
        cv.fig.add_artist(FancyBboxPatch(
            (x / WIDTH, 1 - (y + h) / cv.h), w / WIDTH, h / cv.h, boxstyle="square,pad=0",
            facecolor=PANEL, edgecolor=BORDER, linewidth=1, zorder=-1))
        cv.text(x + 10, y + 16, p["title"], fontsize=px(13), fontweight="bold", va="center")
        # The panel's body sits under its 32 px title bar.
        DRAW[p["type"]](cv, p, prom, x, y + 32, w, h - 32)
    out = Path(out_dir) / f'{board["uid"]}.png'
    cv.fig.savefig(out, dpi=DPI, facecolor=CANVAS)
    plt.close(cv.fig)
    print(f"render: wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prometheus", required=True, help="host:port of its web API")
    ap.add_argument("--start", type=int, required=True, help="unix seconds")
    ap.add_argument("--end", type=int, required=True, help="unix seconds")
    ap.add_argument("--rate-interval", type=int, default=30,
                    help="seconds $__rate_interval stands for (default 30)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("dashboards", nargs="+")
    args = ap.parse_args()
    prom = Prom(args.prometheus, args.start, args.end, args.rate_interval)
    for board in args.dashboards:
        render(board, prom, args.out_dir)


if __name__ == "__main__":
    main()
