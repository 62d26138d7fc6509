"""Fitting a head: AdamW on its trainable parameters, model selection by the task's validation metric (the authors'
criterion, not cross-entropy), the latest of the epochs that tie for the best score, the learning rate halved on a
plateau of that metric, and early stopping that can only end a run after a floor of epochs."""

from __future__ import annotations

import math

import torch

from braindino.train.heads.config import HeadTrainingConfig


def _train_epoch(model, inputs_of, targets: torch.Tensor, optimizer, generator, config: HeadTrainingConfig) -> float:
    size = len(targets)
    batch_size = size if config.task == "survival" else config.batch_size  # Cox needs whole risk sets
    model.train()
    losses = []
    for batch in torch.randperm(size, generator=generator).split(batch_size):
        if config.task == "survival" and targets[batch, 1].sum() == 0:
            continue
        loss = model(**inputs_of(batch), labels=targets[batch]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return sum(losses) / max(len(losses), 1)


def _trained_state(model, frozen: set[str]) -> dict:
    """What training changes: the state without the `frozen` parameters (a frozen ViT-B would be copied at every
    improvement otherwise)."""
    return {name: value.detach().clone() for name, value in model.state_dict().items() if name not in frozen}


def fit_head(model, inputs_of, targets: torch.Tensor, validation, config: HeadTrainingConfig, seed: int) -> dict:
    """Train for at most `max_epochs`; with a `validation()` score (higher is better) keep the best epoch's state
    (of epochs that tie, the latest: macro-AUC on a small validation split saturates at 1.0 within a few epochs, and
    the first tied epoch is an undertrained head), halve the lr after `plateau_patience` epochs without improvement,
    and stop after `patience` epochs without a score at least as good (never before `min_epochs`). An undefined
    score (NaN) counts as no improvement. Without validation, the last epoch is kept. Returns the chosen epoch and
    both curves."""
    generator = torch.Generator().manual_seed(seed)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5,
                                                         patience=config.plateau_patience)
    best = {"score": -math.inf, "epoch": 0, "state": None}
    curves = {"train_loss": [], "validation_score": []}
    for epoch in range(1, config.max_epochs + 1):
        curves["train_loss"].append(round(_train_epoch(model, inputs_of, targets, optimizer, generator, config), 5))
        if validation is None:
            continue
        model.eval()
        with torch.no_grad():
            # at 10 decimals: one AUC summed in another order differs in its last bits, which must not break a tie
            score = round(float(validation()), 10)
        curves["validation_score"].append(round(score, 5) if math.isfinite(score) else None)
        plateau.step(score if math.isfinite(score) else -math.inf)
        if math.isfinite(score) and score >= best["score"]:
            best = {"score": score, "epoch": epoch, "state": _trained_state(model, frozen)}
        elif epoch >= config.min_epochs and epoch - best["epoch"] >= config.patience:
            break
    if best["state"] is not None:
        model.load_state_dict(best["state"], strict=False)
    model.eval()
    return {"epochs": epoch, "best_epoch": best["epoch"] or epoch,
            "validation_score": None if best["state"] is None else best["score"], "curves": curves}
