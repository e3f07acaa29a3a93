"""Markdown tables for docs/zeroshot.md from the records of docs/results/zeroshot_commands_smollm2.sh.

    python docs/results/zeroshot_tables.py DENSE.json UNIFORM.json ATP.json

DENSE.json is `atprune eval --out` 's zeroshot.json; UNIFORM/ATP.json are `atprune prune --json` reports (their
``zero_shot.sparse`` part). Prints acc +- stderr per task, the mean acc (and without BoolQ), acc_norm, and
throughput.
"""

import json
import sys

TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


def load(path: str) -> tuple[dict, dict | None]:
    d = json.load(open(path))
    if d.get("schema", "").startswith("atprune.zeroshot"):
        return d, None
    return d["zero_shot"]["sparse"], d


def main() -> None:
    rows = []
    for path in sys.argv[1:]:
        zs, report = load(path)
        if report is None:
            name = "dense"
        else:
            cfg = report["config"]
            name = f"{cfg['method']} {round(100 * cfg['sparsity'])}% {cfg['allocation']}"
            if cfg.get("beta") is not None:
                name += f" (beta {cfg['beta']:g})"
        rows.append((name, zs, report))
    print("| model | " + " | ".join(TASKS) + " | mean acc | without BoolQ |")
    print("|---|" + "---|" * (len(TASKS) + 2))
    for name, zs, _ in rows:
        t = zs["tasks"]
        cells = [f"{100 * t[k]['acc']:.1f} ± {100 * t[k]['acc_stderr']:.1f}" for k in TASKS]
        rest = sum(t[k]["acc"] for k in TASKS[1:]) / (len(TASKS) - 1)
        print(f"| {name} | " + " | ".join(cells) + f" | **{100 * zs['mean_acc']:.1f}** | {100 * rest:.1f} |")
    norm = [k for k in TASKS if rows[0][1]["tasks"][k]["acc_norm"] is not None]
    print("\n`acc_norm` (%):\n")
    print("| model | " + " | ".join(norm) + " |")
    print("|---|" + "---|" * len(norm))
    for name, zs, _ in rows:
        print(f"| {name} | " + " | ".join(f"{100 * zs['tasks'][k]['acc_norm']:.1f}" for k in norm) + " |")
    print("\n| model | n per task | requests | seconds | requests/s | overall sparsity | prune s | gate |")
    print("|---|---|---|---|---|---|---|---|")
    for name, zs, report in rows:
        ns = sorted({zs["tasks"][k]["n"] for k in TASKS})
        sparsity = f"{report['pruning']['overall_sparsity']:.4f}" if report else "0"
        prune_s = f"{report['timings_s']['prune']:.0f}" if report else "-"
        gate = report["zero_shot"].get("gate") if report else None
        gate = "-" if gate is None else ("flagged" if gate.get("flagged") else "not flagged")
        print(f"| {name} | {ns} | {zs['requests']} | {zs['seconds']:.0f} | {zs['requests_per_s']:.2f} | {sparsity} | "
              f"{prune_s} | {gate} |")


if __name__ == "__main__":
    main()
