"""The lumbar speed rule scan by scan: ``bench_overhead.py --tasks lumbar-foramina --no-aux`` on
each shared spine scan in a process of its own (a scan's figures do not depend on the scans before
it), then the rule's verdicts, the smallest margin and the slowest total. Exits 1 when a scan breaks
the rule or takes over 2 s.

    python Testing/benchmarks/bench_lumbar_round.py [--runs 5] [--per-source 10] [--sources zukic-t2 ...]

--per-source 10 (the default) takes the ten Zukić T2 scans (381 mm), the five ivd-t2 scans of
another centre and MyoSegmenTUM case01-10 (224 mm): 25 scans, about 8 minutes on 2 cores. Run it
on an otherwise idle machine: the rule compares two times measured on it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from SpineKneeSegLib.core.datasets import data_root

HERE = Path(__file__).resolve().parent
SOURCES = ("zukic-t2", "ivd-t2", "myosegmentum")
TOTAL_LIMIT_S = 2.0  # issue 21: within 2 s per case on 2 cores


def scans(root: Path, sources, per_source: int | None) -> list[Path]:
    found = []
    for source in sources:
        found += sorted((root / "spine" / source).glob("case*/image.nii.gz"))[:per_source]
    return found


def bench_scan(path: Path, runs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, str(HERE / "bench_overhead.py"), "--tasks", "lumbar-foramina", "--no-aux",
                        "--runs", str(runs), "--input", str(path), "--json", str(out)],
                       check=False, stdout=subprocess.DEVNULL)
        if not out.exists():
            raise SystemExit(f"bench_overhead.py failed on {path}")
        return json.loads(out.read_text(encoding="utf-8"))[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="measured runs per scan (after one warm-up)")
    parser.add_argument("--per-source", type=int, default=10, help="first N scans of each source (0: all)")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES))
    args = parser.parse_args(argv)
    root = data_root()
    if root is None:
        print("no shared data (set SPINEKNEESEG_DATA)")
        return 2
    paths = scans(root, args.sources, args.per_source or None)
    print(f"{'scan':24} {'shape':12} {'total':>6} {'network':>8} {'outside':>8} {'limit':>6} {'margin':>7}  rule"
          f"   (medians of {args.runs} runs, seconds)", flush=True)
    rows = []
    for path in paths:
        r = bench_scan(path, args.runs)
        name = f"{path.parent.parent.name}/{path.parent.name}"
        rows.append((name, r))
        print(f"{name:24} {'x'.join(map(str, r['shape'])):12} {r['total']:6.3f} {r['network']:8.3f} "
              f"{r['overhead']:8.3f} {r['limit']:6.3f} {r['limit'] - r['overhead']:7.3f}  "
              f"{'ok' if r['ok'] else 'FAIL'}", flush=True)
    met = [n for n, r in rows if r["ok"]]
    tight = min(rows, key=lambda nr: nr[1]["limit"] - nr[1]["overhead"])
    slowest = max(rows, key=lambda nr: nr[1]["total"])
    print(f"rule met on {len(met)} of {len(rows)}; smallest margin {tight[1]['limit'] - tight[1]['overhead']:.3f} s "
          f"({tight[0]}); slowest total {slowest[1]['total']:.3f} s ({slowest[0]}; limit {TOTAL_LIMIT_S} s)")
    return 0 if len(met) == len(rows) and slowest[1]["total"] <= TOTAL_LIMIT_S else 1


if __name__ == "__main__":
    sys.exit(main())
