#!/usr/bin/env python3
"""Turns criterion's output (target/criterion) into the tables and the chart of
docs/benchmarks.md: every benchmark's mean time, the ratio of each tokenkeeper figure to the
raw primitive measured beside it, and an SVG of refresh throughput against the number of
installations per backend with the raw baseline drawn beside it.

Usage: scripts/bench_report.py [criterion dir] [svg path]
"""
import json
import math
import os
import sys

CRITERION = sys.argv[1] if len(sys.argv) > 1 else "target/criterion"
SVG = sys.argv[2] if len(sys.argv) > 2 else "docs/benchmark-refresh-throughput.svg"


def load():
    rows = []
    for root, _dirs, files in os.walk(CRITERION):
        if "benchmark.json" in files and os.path.basename(root) == "new":
            with open(os.path.join(root, "benchmark.json")) as f:
                meta = json.load(f)
            with open(os.path.join(root, "estimates.json")) as f:
                est = json.load(f)
            rows.append({
                "group": meta["group_id"],
                "function": meta.get("function_id") or "",
                "value": meta.get("value_str") or "",
                "mean_ns": est["mean"]["point_estimate"],
            })
    return sorted(rows, key=lambda r: (r["group"], r["function"], r["value"]))


def fmt_time(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def table(rows):
    out = ["| group | benchmark | N | mean |", "|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['group']} | {r['function']} | {r['value']} | {fmt_time(r['mean_ns'])} |")
    return "\n".join(out)


def chart(rows):
    series = {}
    for r in rows:
        if r["group"] != "concurrent_refresh" or not r["value"].isdigit():
            continue
        n = int(r["value"])
        series.setdefault(r["function"], []).append((n, n / (r["mean_ns"] / 1e9)))
    if not series:
        return None
    w, h, left, bottom, top, right = 760, 420, 70, 50, 30, 220
    xs = sorted({n for s in series.values() for n, _ in s})
    ymax = max(t for s in series.values() for _, t in s) * 1.1
    lx = [math.log10(x) for x in xs]
    x0, x1 = min(lx), max(lx) if max(lx) > min(lx) else min(lx) + 1

    def px(n):
        return left + (math.log10(n) - x0) / (x1 - x0) * (w - left - right)

    def py(t):
        return h - bottom - t / ymax * (h - bottom - top)

    colours = ["#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{left}" y="18" font-size="14">Refresh throughput (refreshes/s) vs installations, 64 in flight</text>',
             f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>']
    for n in xs:
        parts.append(f'<text x="{px(n):.1f}" y="{h - bottom + 18}" text-anchor="middle">{n}</text>')
    for i in range(6):
        t = ymax * i / 5
        parts.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:,.0f}</text>')
        parts.append(f'<line x1="{left}" y1="{py(t):.1f}" x2="{w - right}" y2="{py(t):.1f}" stroke="#eee"/>')
    names = sorted(series, key=lambda s: (not s.startswith("raw"), s))
    for i, name in enumerate(names):
        pts = sorted(series[name])
        colour = "#000000" if name.startswith("raw") else colours[i % len(colours)]
        dash = ' stroke-dasharray="6,4"' if name.startswith("raw") else ""
        path = " ".join(f"{px(n):.1f},{py(t):.1f}" for n, t in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for n, t in pts:
            parts.append(f'<circle cx="{px(n):.1f}" cy="{py(t):.1f}" r="3" fill="{colour}"/>')
        ly = top + 16 * i + 10
        parts.append(f'<line x1="{w - right + 15}" y1="{ly}" x2="{w - right + 40}" y2="{ly}" stroke="{colour}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{w - right + 45}" y="{ly + 4}">{name}</text>')
    parts.append(f'<text x="{(left + w - right) / 2}" y="{h - 12}" text-anchor="middle">installations (log scale)</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def ratios(rows):
    by = {(r["group"], r["function"], r["value"]): r["mean_ns"] for r in rows}
    out = ["| figure | ours | raw | time ours/raw | throughput ours/raw |", "|---|---|---|---|---|"]
    for (g, f, v), ns in sorted(by.items()):
        raw = None
        if g == "concurrent_refresh" and not f.startswith("raw"):
            raw = by.get((g, "raw_reqwest_post", v))
        elif g == "single_flight" and not f.startswith("raw"):
            raw = by.get((g, "raw_reqwest_post_one_refresh", ""))
        elif g == "mock_provider" and f.startswith("refresh"):
            raw = by.get((g, "raw_http_roundtrip_10k_64_in_flight", v))
        elif g == "sqlite_scale" and v == "1000000":
            raw = by.get((g, f, "10000"))
            if raw:
                out.append(f"| {g}/{f}: 1,000,000 vs 10,000 records | {fmt_time(ns)} | {fmt_time(raw)} | {ns / raw:.2f} | {raw / ns:.2f} |")
            continue
        elif g == "refresher_sweep":
            raw = by.get(("concurrent_refresh", "raw_reqwest_post", v))
        elif g == "hot_path" and f.startswith("access_token"):
            for cand in ("raw_rwlock_hashmap_lookup_x1000", "raw_rwlock_hashmap_lookup_with_expiry_check_x1000"):
                if (g, cand, v) in by:
                    r = by[(g, cand, v)]
                    out.append(f"| {g}/{f} vs {cand} | {fmt_time(ns)} | {fmt_time(r)} | {ns / r:.2f} | {r / ns:.2f} |")
            continue
        elif g in ("sqlite_ops", "redis_ops") and "tokenkeeper" in f:
            base = f.split("/")[0]
            for cand in ("raw_rusqlite_blocking_pool", "raw_rusqlite_sync", "raw_redis_GET", "raw_redis_EVALSHA"):
                if (g, f"{base}/{cand}", v) in by:
                    r = by[(g, f"{base}/{cand}", v)]
                    out.append(f"| {g}/{f} vs {cand} | {fmt_time(ns)} | {fmt_time(r)} | {ns / r:.2f} | {r / ns:.2f} |")
            continue
        if raw:
            label = f"{g}/{f}" + (f"/{v}" if v else "")
            out.append(f"| {label} | {fmt_time(ns)} | {fmt_time(raw)} | {ns / raw:.2f} | {raw / ns:.2f} |")
    return "\n".join(out)


def main():
    rows = load()
    if not rows:
        sys.exit(f"no criterion results under {CRITERION}: run `cargo bench` first")
    print("## Ratios\n")
    print(ratios(rows))
    print("\n## All figures\n")
    print(table(rows))
    svg = chart(rows)
    if svg:
        os.makedirs(os.path.dirname(SVG) or ".", exist_ok=True)
        with open(SVG, "w") as f:
            f.write(svg)
        print(f"\n(chart written to {SVG})")


if __name__ == "__main__":
    main()
