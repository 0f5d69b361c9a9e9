"""Print the per-preset plan table of docs/performance.md and README ("Real sizes"): the code as it
is, 256 uids, a 1 Gbit/s link, from `bistro plan --preset P --uids 256 --hardware H --json`.

    python scripts/plan_table.py [--design new]
"""

from __future__ import annotations

import argparse

from bistro.config import build_settings
from bistro.plan import NEW_DESIGN, design_from, make_plan

ROWS = [("150M", "1xH100"), ("150M", "8xH100"), ("1B", "8xH100"), ("1B", "4xH200"), ("1B", "1xH100"),
        ("7B", "8xH100"), ("7B", "4xH200"), ("7B", "1xH100")]  # fmt: skip
GIB, TIB = 2**30, 2**40


def row(preset: str, hardware: str, new: bool) -> str:
    design = design_from(NEW_DESIGN) if new else None
    p = make_plan(build_settings(preset), uids=256, hardware=hardware, link_gbit=1.0, design=design)
    v, m, pub, fits = p["validator"], p["miner"], p["publisher"], p["fits"]
    critical = f"{fits['critical_path_seconds']:,.0f} ({'fits' if fits['critical_path'] else 'no'})"
    return (
        f"| {preset} | {hardware} | {p['window_seconds']:,.0f} | {v['seconds_per_window']:,.0f} | "
        f"{m['seconds_per_window']:,.0f} | {critical} | {m['train_fraction']:.2f} ({m['steps_per_window']:,}) | "
        f"{v['scored_uids_per_window']} / {v['rotation_windows']} | "
        f"{v['peak_bytes_per_gpu'] / 1e9:.1f} / {m['peak_bytes_per_gpu'] / 1e9:.1f} | {v['peak_host_bytes'] / 1e9:.0f} | "
        f"{v['download_per_window_bytes'] / GIB:.2f} / {m['download_per_window_bytes'] / GIB:.3f} | "
        f"{pub['upload_per_window_bytes'] / GIB:.2f} | {pub['disk_per_1000_windows_bytes'] / TIB:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--design", choices=["code", "new"], default="code")
    args = parser.parse_args()
    print("| preset | hardware | window s | validator s | miner s | critical path s | train fraction (steps) "
          "| scored / rotation | GPU GB val / miner | host GB val | down GiB val / miner | publish GiB "
          "| disk TiB / 1,000 w |")  # fmt: skip
    print("|" + " --- |" * 13)
    for preset, hardware in ROWS:
        print(row(preset, hardware, args.design == "new"))


if __name__ == "__main__":
    main()
