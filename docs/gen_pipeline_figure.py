"""Draw docs/img/pipeline-h200.png from the two GPU traces in docs/traces/.

Each trace is a Chrome trace (JSON, timestamps in microseconds) written by `asyncbatch run --trace` on the
`cuda` runtime: host phases `prep`/`upd` on the host track, device ops `h2d`/`comp`/`d2h` on stream tracks,
`args.batch` on every event. The figure shows the same window of consecutive decode steps from each trace, one
row per role (host, h2d, compute, d2h), the synchronous loop on top and the default asynchronous engine below.
The synchronous engine (`single`/`one`) runs every device op on one stream, `main`; its ops are placed in the
row of their role.

Run from the repository root (needs matplotlib):

    python docs/gen_pipeline_figure.py
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

DOCS = Path(__file__).resolve().parent
TRACES = [
    ("synchronous loop: single / one / eager", DOCS / "traces" / "h200-sync-single-one-eager.json"),
    ("default asynchronous engine: double / three / per_slot", DOCS / "traces" / "h200-default-double-three-per_slot.json"),
]
ROWS = ["host", "h2d", "compute", "d2h"]
ROW_OF = {"prep": "host", "upd": "host", "h2d": "h2d", "comp": "compute", "d2h": "d2h"}
BOX = {"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.9}
COLORS = {"prep": "#4C72B0", "upd": "#8172B3", "h2d": "#55A868", "comp": "#DD8452", "d2h": "#C44E52"}


def load(path: Path) -> list[dict]:
    """Complete events (`ph == "X"`) with times in milliseconds."""
    events = json.loads(path.read_text())["traceEvents"]
    out = []
    for e in events:
        if e.get("ph") == "X" and e["name"] in ROW_OF:
            out.append({"name": e["name"], "batch": e["args"]["batch"], "start": e["ts"] / 1e3,
                        "end": (e["ts"] + e["dur"]) / 1e3, "tokens": e["args"].get("tokens"),
                        "graph": e["args"].get("graph")})
    return out


def compute_gaps(events: list[dict], first: int, last: int) -> list[float]:
    comps = sorted((e for e in events if e["name"] == "comp" and first <= e["batch"] <= last),
                   key=lambda e: e["start"])
    return [b["start"] - a["end"] for a, b in zip(comps, comps[1:], strict=False)]


def draw(ax, title: str, events: list[dict], first: int, steps: int) -> None:
    last = first + steps - 1
    comps = [e for e in events if e["name"] == "comp" and first <= e["batch"] <= last]
    t0 = min(e["start"] for e in comps)
    t1 = max(e["end"] for e in comps)
    span = t1 - t0
    lo, hi = t0 - 0.04 * span, t1 + 0.04 * span
    min_w = span * 0.004  # copies last microseconds: draw them at least this wide so they show
    y = {row: len(ROWS) - 1 - i for i, row in enumerate(ROWS)}
    for e in events:
        if e["end"] < lo or e["start"] > hi:
            continue
        row = ROW_OF[e["name"]]
        x, w = e["start"] - t0, max(e["end"] - e["start"], min_w)
        ax.broken_barh([(x, w)], (y[row] - 0.35, 0.7), facecolors=COLORS[e["name"]], edgecolor="black",
                       linewidth=0.3)
        if e["name"] == "comp":
            label = f"comp {e['batch']}" if w > 0.06 * span else str(e["batch"])
            ax.text(x + w / 2, y[row], label, ha="center", va="center", fontsize=8, color="white", weight="bold",
                    clip_on=True)
        elif e["name"] == "prep" and (e["end"] - e["start"]) > 0.02 * span:
            ax.text(x + w / 2, y[row], str(e["batch"]), ha="center", va="center", fontsize=7, color="white",
                    clip_on=True)
        elif row == "host":  # short host bars sit side by side (upd k, prep k+1): label them apart
            left = e["name"] == "upd"
            ax.text(x + (0 if left else w), y[row] + 0.42, f"{e['name'][0]}{e['batch']}",
                    ha="right" if left else "left", va="bottom", fontsize=6, clip_on=True)
        else:  # short bars: the batch index above the bar
            ax.text(x + w / 2, y[row] + 0.42, str(e["batch"]), ha="center", va="bottom", fontsize=6, clip_on=True)
    note_comp = sorted(comps, key=lambda e: e["start"])[1]
    note_prep = next(e for e in events if e["name"] == "prep" and e["batch"] == note_comp["batch"] + 1)
    if note_prep["start"] < note_comp["end"]:  # the host prepares k+1 while the device computes k
        ax.annotate(f"prep {note_prep['batch']} runs while\ncomp {note_comp['batch']} computes",
                    xy=(note_prep["end"] - t0, y["host"] - 0.2), xytext=(note_prep["end"] - t0 + 0.03 * span, y["h2d"]),
                    fontsize=7, va="center", arrowprops={"arrowstyle": "->", "linewidth": 0.6}, bbox=BOX)
    else:  # the device waits for the host between steps
        gap_end = next(e for e in comps if e["batch"] == note_comp["batch"] + 1)["start"]
        ax.annotate(f"device idle {gap_end - note_comp['end']:.1f} ms:\nupd {note_comp['batch']}, "
                    f"prep {note_prep['batch']}, launch",
                    xy=(note_comp["end"] - t0, y["compute"] + 0.3), xytext=(note_comp["end"] - t0 + 0.03 * span, y["h2d"]),
                    fontsize=7, va="center", arrowprops={"arrowstyle": "->", "linewidth": 0.6}, bbox=BOX)
    gaps = compute_gaps(events, first, last)
    comp_ms = statistics.median(e["end"] - e["start"] for e in comps)
    busy = sum(e["end"] - e["start"] for e in comps) / span
    ax.set_title(f"{title}\nbatches {first}-{last}: compute {comp_ms:.1f} ms per step, idle gap between steps "
                 f"{statistics.median(gaps):.2f} ms (median), compute busy {busy:.1%}", fontsize=9, loc="left")
    ax.set_yticks([y[r] for r in ROWS])
    ax.set_yticklabels(ROWS)
    ax.set_xlim(lo - t0, hi - t0)
    ax.set_ylim(-0.6, len(ROWS) - 0.2)
    ax.set_xlabel("ms from the start of the window", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(axis="x", alpha=0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-batch", type=int, default=10, help="first batch of the window (default 10)")
    parser.add_argument("--steps", type=int, default=6, help="decode steps in the window (default 6)")
    parser.add_argument("--out", type=Path, default=DOCS / "img" / "pipeline-h200.png")
    args = parser.parse_args()

    fig, axes = plt.subplots(len(TRACES), 1, figsize=(11, 6.4))
    for ax, (title, path) in zip(axes, TRACES, strict=True):
        events = load(path)
        window = [e for e in events if e["name"] == "comp" and args.first_batch <= e["batch"]
                  < args.first_batch + args.steps]
        if len(window) != args.steps or any(e["tokens"] != 32 for e in window):
            raise SystemExit(f"{path.name}: batches {args.first_batch}..+{args.steps} are not all decode steps")
        draw(ax, title, events, args.first_batch, args.steps)
    where = {"prep": "host", "upd": "host", "h2d": "copy", "comp": "compute", "d2h": "copy"}
    handles = [Patch(facecolor=c, edgecolor="black", linewidth=0.3, label=f"{n} ({where[n]})")
               for n, c in COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle("NVIDIA H200, Llama-3-8B shape (random weights, bf16), 32 requests decoding together, "
                 "2026-11-26", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"written: {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
