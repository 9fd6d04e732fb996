"""The offline demo: a synthetic cohort (or a real data set), cross-validated end to end.

``demo`` writes a synthetic cohort into ``OUT/synthetic-cohort`` (kept, so reruns reuse it and
its embeddings) and runs :func:`embedstore.evaluation.evaluate` on it: embed, align, index,
predict, score, report. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from embedstore._atomic import atomic_folder
from embedstore._params import validated
from embedstore.evaluation import SYNTHETIC_COHORT, EvalResult, evaluate, prepare_out
from embedstore.testing import make_synthetic_cohort

__all__ = ["demo"]


@validated
def demo(out: str | Path = "demo-out", data: str | Path | None = None, seed: int = 0) -> EvalResult:
    """The offline main job: synthetic cohort (or ``data``), embed, align, index, predict, evaluate.

    Parameters
    ----------
    out
        Output folder.
    data
        A real ST data set to cross-validate instead of the synthetic cohort.
    seed
        Seed of the synthetic cohort and of training.
    """
    out = Path(out)
    prepare_out(out)  # before the synthetic cohort is written into it
    synthetic = data is None
    if synthetic:
        cohort_dir = out / SYNTHETIC_COHORT
        if not (cohort_dir / "data").is_dir():
            # Generated beside and swapped in: a killed run never leaves half a cohort to evaluate.
            with atomic_folder(cohort_dir) as tmp:
                make_synthetic_cohort(
                    tmp, n_slides=6, n_patients=3, n_spots=80, n_genes=60, seed=seed, width=3000, height=3000
                )
        data = cohort_dir
    # The synthetic cohort has ~80 spots per slide: fewer neighbours and genes than a real cohort.
    # Stain normalisation is left to `embedstore evaluate`: it embeds every slide a second time.
    return evaluate(
        data, out, seed=seed, k=20 if synthetic else 50, n_genes=60 if synthetic else 250,
        additions=("context", "smooth"),
    )  # fmt: skip
