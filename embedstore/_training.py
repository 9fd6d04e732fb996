"""The training loop shared by the aligner and the learned aggregator.

Epochs over shuffled mini-batches with :class:`embedstore._adamw.AdamW`, a validation loss
after each epoch, and patience-based early stopping that leaves the model at its best
validation epoch. The model and the loss of a batch come from the caller; the loop owns the
optimizer, the shuffling generator, the history and the progress lines.
Import this module lazily: it imports torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch

from embedstore._adamw import AdamW
from embedstore._progress import step

__all__ = ["train"]

EPOCH_LINE = "%s epoch %d/%d: train %.4f val %.4f (%.1f s)"
EARLY_STOP_LINE = "%s: early stop at epoch %d (patience %d); keeping epoch %d, val %.4f"


def train(
    model: torch.nn.Module,
    batch_loss: Callable[[np.ndarray], torch.Tensor],
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    *,
    name: str,
    seed: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    max_epochs: int,
    patience: int,
    min_improvement: float,
    min_batch: int = 1,
    after_step: Callable[[], None] | None = None,
    threads: int = 0,
) -> list[dict[str, float]]:
    """Train ``model`` in place; it ends at the epoch with the lowest validation loss.

    Parameters
    ----------
    model
        The module to train; its trainable parameters go to AdamW.
    batch_loss
        Row indices of one mini-batch -> the mean loss of those rows (a scalar tensor).
    train_idx, val_idx
        Rows to train on and to validate on; with fewer than ``min_batch`` validation rows the
        training loss stands in for the validation loss.
    name
        What is trained, for the progress lines (``aligner epoch 3/60: ...``).
    seed
        Seeds the shuffling of the training rows.
    lr, weight_decay
        AdamW settings.
    batch_size
        Rows per mini-batch; the last, smaller batch of an epoch is kept.
    max_epochs, patience
        Stop after ``max_epochs``, or after ``patience`` epochs without a validation loss
        lower than the best by more than ``min_improvement``.
    min_batch
        Batches with fewer rows are skipped (a contrastive loss needs negatives).
    after_step
        Called after each optimizer step (e.g. to clamp a parameter).
    threads
        torch CPU threads while training; 0 keeps torch's setting.

    Returns
    -------
    One dict per epoch: ``epoch`` (from 0), ``train_loss``, ``val_loss``, ``seconds`` since the start.
    """
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)

    def run_epoch(idx: np.ndarray, training: bool) -> float:
        model.train(training)
        order = idx[torch.randperm(len(idx), generator=gen).numpy()] if training else idx
        total, count = 0.0, 0
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            if len(rows) < min_batch:
                continue
            with torch.set_grad_enabled(training):
                loss = batch_loss(rows)
            if training:
                opt.zero_grad()
                loss.backward()
                opt.step()
                if after_step is not None:
                    after_step()
            total += float(loss.detach()) * len(rows)
            count += len(rows)
        return total / max(count, 1)

    history: list[dict[str, float]] = []
    best, best_epoch, best_state, stale = math.inf, 0, None, 0
    t0 = time.perf_counter()
    prev_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        for epoch in range(max_epochs):
            train_loss = run_epoch(train_idx, True)
            val_loss = run_epoch(val_idx, False) if len(val_idx) >= min_batch else train_loss
            seconds = time.perf_counter() - t0
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "seconds": seconds})
            step(EPOCH_LINE, name, epoch + 1, max_epochs, train_loss, val_loss, seconds)
            if val_loss < best - min_improvement:
                best, best_epoch, stale = val_loss, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
                if stale >= patience:
                    step(EARLY_STOP_LINE, name, epoch + 1, patience, best_epoch + 1, best)
                    break
    finally:
        torch.set_num_threads(prev_threads)
    if best_state is not None:
        model.load_state_dict(best_state)
    return history
