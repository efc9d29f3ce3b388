"""The memory fit check's estimate against every measured peak in bench/results/ (or the files given).

    python scripts/fit_vs_bench.py [RESULTS.json ...] [--device cpu|cuda] [--json OUT]

CPU rows compare the process's peak RSS with the estimate's total; CUDA rows the peak allocated memory with the
estimate's allocated bytes (and the reserved peak with allocated plus the allocator's slack). Prints one line per row
and the mean and largest error per device. Rows of the tiny dry-run models and failed rows are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rows_of(files: list[Path], device: str | None) -> list[dict]:
    rows = []
    for f in files:
        for r in json.loads(f.read_text()).get("rows", []):  # (the peer benchmark's files have none)
            if "error" not in r and not r.get("tiny") and (device is None or r["device"] == device):
                rows.append(dict(r, file=f.name))
    return rows


def compare(rows: list[dict]) -> list[dict]:
    from sdlora.training.memory.fit import check_row

    return [dict(r, **check_row(r)) for r in rows]


def residue(r: dict) -> bool:
    """An NF4 row on the CPU: its step RSS may still hold the full-precision weights freed after quantizing, so it
    lies between the step's estimate and the loading peak rather than on the first."""
    return r["device"] == "cpu" and r["quantize"] == "nf4"


def summary(checked: list[dict]) -> list[str]:
    lines = []
    for device in sorted({r["device"] for r in checked}):
        errs = [abs(r["error"]) for r in checked if r["device"] == device and not residue(r)]
        if errs:
            lines.append(f"{device}: {len(errs)} rows, mean |error| {sum(errs) / len(errs):.1%}, "
                         f"largest {max(errs):.1%}")
    nf4 = [r for r in checked if residue(r)]
    if nf4:
        inside = sum(r["estimate_gb"] <= r["measured_gb"] * 1.12 and r["measured_gb"] <= r["load_gb"] * 1.12
                     for r in nf4)
        lines.append(f"cpu NF4: {inside} of {len(nf4)} rows between the step's estimate and the loading peak")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--json", type=Path, help="Also write the compared rows here.")
    args = p.parse_args()
    files = args.files or sorted((ROOT / "bench" / "results").glob("*.json"))
    checked = compare(rows_of(files, args.device))
    if not checked:
        sys.exit("no measured rows to compare (run scripts/bench_train.py first)")
    print(f"{'model':<6}{'px':>6}{'batch':>6}{'prec':>6}{'cache':>6}{'base':>6}{'device':>7} {'switch':<38}"
          f"{'measured':>9}{'estimate':>9}{'error':>8}")
    for r in checked:
        cache = "on" if r["cached"] else "off"
        print(f"{r['family']:<6}{r['resolution']:>6}{r['batch']:>6}{r['precision']:>6}{cache:>6}"
              f"{'nf4' if r['quantize'] == 'nf4' else 'full':>6}{r['device']:>7} {r.get('switch', '')[:37]:<38}"
              f"{r['measured_gb']:>9.2f}{r['estimate_gb']:>9.2f}{r['error']:>+8.1%}"
              + (f"  (loading peak {r['load_gb']:.2f})" if residue(r) else ""))
    print("\n".join(summary(checked)))
    if args.json:
        args.json.write_text(json.dumps(checked, indent=1) + "\n")


if __name__ == "__main__":
    main()
