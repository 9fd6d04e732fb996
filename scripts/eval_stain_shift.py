"""Synthetic patients with their own stain and scanner blur: what each addition of ``evaluate`` gains.

Writes a synthetic legacy-ST cohort (``embedstore.testing.make_synthetic_cohort``) whose patients
differ in H&E stain vectors (``--stain-shift``) and scanner blur (one sigma per patient), while
their expression depends on the tissue only, then cross-validates every method by patient with
``embedstore.evaluate`` and prints the table and the paired gains of context, smoothing and stain
normalisation. Run::

    .venv/bin/python scripts/eval_stain_shift.py --out /tmp/stain-shift
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import embedstore as es
from embedstore.testing import make_synthetic_cohort


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="Folder for the cohort and the evaluation.")
    ap.add_argument("--patients", type=int, default=4)
    ap.add_argument("--sections-per-patient", type=int, default=2)
    ap.add_argument("--spots", type=int, default=120)
    ap.add_argument("--stain-shift", type=float, default=0.25)
    ap.add_argument("--blur", type=float, nargs="*", default=[0.0, 1.5, 0.0, 2.5], help="Blur sigma (px) per patient.")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    blur = (args.blur * args.patients)[: args.patients]
    cohort = make_synthetic_cohort(
        args.out / "cohort", n_slides=args.patients * args.sections_per_patient, n_spots=args.spots, n_genes=60,
        seed=args.seed, width=2400, height=2400, mpp=1.0, n_patients=args.patients,
        stain_shift=args.stain_shift, blur_sigma_px=blur,
    )  # fmt: skip
    result = es.evaluate(cohort.root, args.out / "eval", k=20, n_genes=60, seed=args.seed, workers=1)
    print(result.table())
    print(json.dumps({a: {m: g["hvg50"] for m, g in by.items()} for a, by in result.metrics["gains"].items()}, indent=1))


if __name__ == "__main__":
    main()
