"""Draws docs/metrics-run.png from the series `examples/prometheus --self-test --csv` scraped.

    cargo run --example prometheus -- --self-test --csv docs/metrics-run.csv
    python3 docs/plot_metrics.py docs/metrics-run.csv docs/metrics-run.png   # needs matplotlib

Three panels on one time axis (seconds of the run): refreshes per second (successful and
failed, from the counters' differences between scrapes), the refresher's lag (now minus the
oldest due time, in the fleet's clock), and installations by state.
"""

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STATES = ["active", "refreshing", "backoff", "reauthorization_required", "revoked"]


def rates(times, counts):
    out = []
    for n in range(1, len(times)):
        dt = times[n] - times[n - 1]
        out.append((counts[n] - counts[n - 1]) / dt if dt > 0 else 0.0)
    return out


def main(source, target):
    with open(source, newline="") as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    t = [r["seconds"] for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, sharex=True, figsize=(9, 8))
    fig.suptitle(
        "tokenkeeper metrics scraped from /metrics: 200 installations, 60 s tokens, clock x8\n"
        "10 grants revoked at 6 s, 40 % provider 503s from 11 s to 14 s"
    )
    ax1.plot(t[1:], rates(t, [r["refreshes_ok"] for r in rows]), label="refreshed")
    ax1.plot(t[1:], rates(t, [r["refreshes_failed"] for r in rows]), label="failed")
    ax1.set_ylabel("refreshes / s")
    ax1.legend(loc="upper left")
    ax2.plot(t, [r["refresher_lag_seconds"] for r in rows], color="tab:red")
    ax2.set_ylabel("refresher lag\n(s, fleet clock)")
    ax3.stackplot(t, *[[r[s] for r in rows] for s in STATES], labels=STATES)
    ax3.set_ylabel("installations")
    ax3.set_xlabel("seconds since the run started")
    ax3.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    fig.savefig(target, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
