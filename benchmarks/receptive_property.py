"""Long campaign of the receptive-field property check (tests/test_receptive_property.py, bigger).

python benchmarks/receptive_property.py --graphs N --seed S [--out results.json]
    [--controls K] [--trials T] [--refuse-share F] [--pass-from FILE] [--verbose]
python benchmarks/receptive_property.py --seed S --index I --verbose     # replay (and shrink) one case

Random ONNX prefixes (benchmarks/graphgen.py) go through scalecert.export.receptive (or the module
in --pass-from, e.g. `git show HEAD~5:scalecert/export/receptive.py > /tmp/old.py`); ONNX Runtime
(CPU) measures the real dependence of every accepted value by perturbing each input pixel. Prints
one line (graphs, accepted, refused, pixels perturbed, violations, and the other failure counts),
one line per negative control, and with --verbose the smallest failure of each kind, shrunk, as
ONNX text. Exit status 1 when anything failed or a control went uncaught.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import graphgen as gg  # noqa: E402


def _failures(results, impl, shrink: bool) -> list[dict]:
    out = []
    for field, keyed in gg.failure_groups(results).items():
        for key, bad in sorted(keyed.items()):
            smallest = min(bad, key=lambda r: (len(r.case.model.graph.node), r.case.index))
            small = gg.shrink(smallest, field, impl=impl) if shrink else smallest
            detail = getattr(small, field)
            out.append({
                "category": field, "key": key, "graphs": len(bad),
                "indices": sorted(r.case.index for r in bad)[:50],
                "seed": smallest.case.seed, "index": smallest.case.index, "kind": smallest.case.kind,
                "layers": smallest.case.layers,
                "detail": detail if isinstance(detail, str) else list(detail[:4]),
                "onnx": gg.text(small.case.model),
            })
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--graphs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index", type=int, help="replay this one case of the campaign")
    parser.add_argument("--controls", type=int, default=40, help="graphs per negative control (0: none)")
    parser.add_argument("--trials", type=int, default=3, help="perturbations per pixel")
    parser.add_argument("--refuse-share", type=float, default=0.25)
    parser.add_argument("--pass-from", help="a file implementing the pass's API instead of scalecert's")
    parser.add_argument("--no-shrink", action="store_true", help="report failures as generated")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--out", help="write the summary, the controls and the failures as JSON")
    args = parser.parse_args()

    impl = gg.load_pass(args.pass_from)
    start = time.time()
    indices = [args.index] if args.index is not None else range(args.graphs)
    results = []
    for index in indices:
        case = gg.case_at(args.seed, index, args.refuse_share)
        results.append(gg.check(case, trials=args.trials, impl=impl))
        if args.index is not None:
            print(case.describe())
            print(gg.text(case.model))
    summary = gg.summarize(results)
    elapsed = time.time() - start
    print(f"receptive_property seed={args.seed}: {gg.summary_line(summary)} ({elapsed:.1f}s)")

    controls = {}
    if args.index is None:
        for name, (force, mutate) in gg.CONTROLS.items():
            rs = [gg.check(gg.generate(args.seed, i, "accept", force=force), mutate=mutate, trials=args.trials,
                           impl=impl) for i in range(args.controls)]
            s = gg.summarize(rs)
            ran = s["graphs"] - s["skipped"]
            controls[name] = {**s, "ran": ran, "caught": s["violations"] > 0}
            if args.controls:
                print(f"control {name}: {s['violations']}/{ran} graphs with violations "
                      f"(pairs={s['violating_pairs']}, skipped={s['skipped']}, errors={s['errors']})"
                      f"{'' if s['violations'] else '  NOT CAUGHT'}")

    failures = _failures(results, impl, not args.no_shrink) if (args.verbose or args.out) else []
    if args.verbose:
        for f in failures:
            print(f"\n{f['category']} [{f['key']}]: {f['graphs']} graphs, e.g. seed={f['seed']} index={f['index']}")
            print("  " + " -> ".join(f["layers"]))
            print("  " + (f["detail"] if isinstance(f["detail"], str) else "\n  ".join(f["detail"])))
            print("  " + f["onnx"].replace("\n", "\n  "))
        for r in results:
            for note in r.notes:
                if args.index is not None:
                    print("note:", note)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"seed": args.seed, "graphs": len(results), "trials": args.trials,
                       "pass": args.pass_from or "scalecert.export.receptive", "elapsed_s": round(elapsed, 1),
                       "summary": summary, "controls": controls, "failures": failures}, fh, indent=1)
    failed = any(summary[k] for k in ("violations", "wrongly_refused", "wrongly_accepted", "bad_reasons",
                                      "shape_mismatches", "errors"))
    uncaught = any(args.controls and not c["caught"] for c in controls.values())
    return 1 if failed or uncaught else 0


if __name__ == "__main__":
    sys.exit(main())
