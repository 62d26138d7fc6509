"""Fitting a head: AdamW on its trainable parameters, model selection on a validation split, early stopping."""

from __future__ import annotations

import copy
import math

import torch

from braindino.train.heads.config import HeadTrainingConfig


def fit_head(model, inputs_of, targets: torch.Tensor, validation, config: HeadTrainingConfig, seed: int) -> dict:
    """AdamW on the trainable parameters; keep the state with the lowest validation loss (early stopping)."""
    generator = torch.Generator().manual_seed(seed)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    best = {"loss": math.inf, "epoch": 0, "state": None}
    size = len(targets)
    batch_size = size if config.task == "survival" else config.batch_size  # Cox needs whole risk sets
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        for batch in torch.randperm(size, generator=generator).split(batch_size):
            if config.task == "survival" and targets[batch, 1].sum() == 0:
                continue
            loss = model(**inputs_of(batch), labels=targets[batch]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if validation is None:
            continue
        model.eval()
        with torch.no_grad():
            validation_loss = float(validation())
        if validation_loss < best["loss"]:
            best = {"loss": validation_loss, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        elif epoch - best["epoch"] >= config.patience:
            break
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    return {"epochs": epoch, "best_epoch": best["epoch"] or epoch,
            "validation_loss": None if validation is None else best["loss"]}
