"""`make soak`'s plot and verdict: samples.csv + events.csv -> a PNG, and one line.

For each of RSS, open files, RocksDB size (summed over the instances) and changelog size, the
largest value of the last third of the run must be at most 1.25x the largest of the middle
third (a plateau); exits 1 otherwise. The first third is the warm-up (state fills one dedupe
window, caches fill).
"""

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GROWTH = 1.25
MIB = 2**20


def main(samples_path, events_path, out):
    rows = [{k: float(v or 0) for k, v in r.items()} for r in csv.DictReader(open(samples_path))]
    if len(rows) < 9:
        sys.exit("soak: too few samples")
    events = []
    try:
        events = [r for r in csv.reader(open(events_path)) if r]
    except FileNotFoundError:
        pass
    t = [r["t_s"] / 60 for r in rows]
    series = {
        "rss": ("resident memory (MiB)", ["rss0", "rss1"], MIB),
        "fds": ("open files", ["fds0", "fds1"], 1),
        "rocksdb": ("RocksDB on disk (MiB)", ["rocksdb0", "rocksdb1"], MIB),
        "changelog": ("changelog in the broker (MiB)", ["changelog"], MIB),
    }
    n = len(rows)
    mid, last = rows[n // 3 : 2 * n // 3], rows[2 * n // 3 :]
    verdicts = []
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    for ax, (name, (label, cols, unit)) in zip(axes, series.items()):
        for c in cols:
            ax.plot(t, [r[c] / unit for r in rows], label=f"instance {c[-1]}" if len(cols) > 1 else None)
        total = lambda r: sum(r[c] for c in cols)  # noqa: E731
        a, b = max(map(total, mid)), max(map(total, last))
        ok = b <= GROWTH * a
        verdicts.append((name, a / unit, b / unit, ok))
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.set_title(f"{name}: max of middle third {a / unit:,.0f} -> last third {b / unit:,.0f} "
                     f"({'plateau' if ok else 'GROWING'})", fontsize=9, loc="left")
        if len(cols) > 1:
            ax.legend(fontsize=8, loc="upper left")
        for e in events:
            at = float(e[0]) / 60
            if e[1] == "kill":
                ax.axvline(at, color="red", alpha=0.35, lw=1)
        starts = [float(e[0]) / 60 for e in events if e[1] == "outage_start"]
        ends = [float(e[0]) / 60 for e in events if e[1] == "outage_end"]
        for s, e in zip(starts, ends):
            ax.axvspan(s, e, color="orange", alpha=0.25)
    axes[-1].set_xlabel("minutes (red: SIGKILL of an instance; orange: broker stopped)")
    fig.suptitle("drawdown soak: 2 instances, SIGKILL every 3 min, one broker outage")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    ok = all(v[3] for v in verdicts)
    fmt = lambda x, name: f"{x:.0f}" if name == "fds" else f"{x:.0f}MiB"  # noqa: E731
    print(("plateau" if ok else "GROWING") + f" samples={n} "
          + " ".join(f"{name}={fmt(a, name)}->{fmt(b, name)}" for name, a, b, _ in verdicts))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
