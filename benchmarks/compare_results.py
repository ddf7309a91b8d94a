"""Paired comparison of the same variants across two benchmark results files run with the same folds and seed
(so the same test cases): e.g. one bundle at two settings that the benchmark's own pairs cannot compare (two
``--out`` folders, two machines), or one variant of A against another of B (``--against``: e.g. a method run once
against a comparison run later into another folder, on the same folds). Per variant, region and fraction: the per-case mean difference (A minus B), its
95% bootstrap CI, cases better/worse and the verdict, by the harness's own statistics
(``medssl.apps.benchmark.pooled``, ``medssl.apps.stats.paired_bootstrap``).

    python benchmarks/compare_results.py A/results.json B/results.json --variants method,baseline --out cmp.json
    python benchmarks/compare_results.py A/results.json B/results.json --variants method --against vanilla_barlow_twins
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medssl.apps.benchmark import pooled
from medssl.apps.stats import paired_bootstrap, paired_differences
from medssl.utils import atomic_write_json


def compare_files(a: Path, b: Path, variants: list[str], against: str | None = None) -> dict:
    """Each of ``variants`` in ``a`` against the same variant in ``b`` (or, given ``against``, that variant of ``b``),
    paired per test case."""
    ra, rb = json.loads(Path(a).read_text()), json.loads(Path(b).read_text())
    if (ra["folds"], ra["seed"]) != (rb["folds"], rb["seed"]):
        raise ValueError(f"{b}: folds={rb['folds']}, seed={rb['seed']}; expected those of {a} "
                         f"(folds={ra['folds']}, seed={ra['seed']}): other test cases cannot be paired")
    rows = []
    for variant in variants:
        for fraction in sorted(set(ra["fractions"]) & set(rb["fractions"])):
            ca, cb = ([r for r in res["runs"] if r["variant"] == name and r["fraction"] == fraction]
                      for res, name in ((ra, variant), (rb, against or variant)))
            if not ca or not cb:
                raise ValueError(f"no runs of {variant!r} in {a} or of {against or variant!r} in {b} at fraction "
                                 f"{fraction:g}; expected finished runs in both")
            for region in ra["regions"]:
                values = [{k: v.get(region) for k, v in pooled(runs).items()} for runs in (ca, cb)]
                rows.append({"variant": variant, **({"against": against} if against else {}),
                             "fraction": fraction, "region": region,
                             **paired_bootstrap(paired_differences(*values))})
    return {"a": str(a), "b": str(b), "difference": "a minus b, per test case", "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--variants", default="method,baseline")
    parser.add_argument("--against", default=None, help="the variant of B each of --variants is compared with "
                        "(default: the same variant)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = compare_files(args.a, args.b, [v for v in args.variants.split(",") if v], args.against)
    for r in result["rows"]:
        lo, hi = r["ci"]
        print(f"{r['variant']} {r['fraction']:g} {r['region']}: {r['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}] "
              f"{r['better']}/{r['worse']} {r['verdict']} (n={r['n']})")
    if args.out:
        atomic_write_json(result, args.out)


if __name__ == "__main__":
    main()
