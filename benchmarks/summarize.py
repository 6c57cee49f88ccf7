"""Print a markdown table of a bench_score JSON: medians, and ratios against baselines measured in the same run.

    python benchmarks/summarize.py benchmarks/results/<file>.json
"""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as f:
        d = json.load(f)
    mi = d["machine_info"]
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in d["benchmarks"]:
        groups[b["group"]][b["name"].split("[")[0]] = b
    print(f"Machine: {mi.get('cpu_count')} cores ({mi.get('cpu_model', mi.get('processor'))}), torch "
          f"{mi.get('torch')}, {mi.get('torch_threads')} threads, spectra_gpu {mi.get('spectra_gpu')} @ "
          f"{mi.get('git_sha')}, {d['datetime'][:10]}\n")
    print("| layer (ReLU, fp32) | sg.score | 2 Gram products (floor) | sklearn kNN + scipy eigsh | score / floor | "
          "reference / score | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for g, rows in sorted(groups.items()):
        if not g.startswith("score-"):
            continue
        ours, floor, ref = (rows.get(n, {}).get("stats", {}).get("median") for n in
                            ("test_score", "test_gram_floor", "test_reference_pipeline"))
        shape = g.split("-", 2)[2]
        rss = groups.get(f"peak-rss-{g.split('-')[1]}", {}).get("test_peak_rss", {}).get("extra_info", {})
        peak = f"{rss['peak_rss_gib']:.2f} GiB" if "peak_rss_gib" in rss else "n/a"
        print(f"| {shape} | {ours:.2f} s | {floor:.2f} s | {ref:.1f} s | {ours / floor:.2f}x | {ref / ours:.1f}x | "
              f"{peak} |")


if __name__ == "__main__":
    main(sys.argv[1])
