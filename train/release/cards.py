"""Model cards from real results JSON: `huggingface_hub.ModelCard` filled from the templates in `model_cards/`."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from braindino.pipelines import HEAD_TASKS, carries_pipeline_code

# The package is not on PyPI yet: the install line every card shows must be one that works.
INSTALL = ("Install the package from a checkout of the BrainDINO repository (it is not on PyPI yet): "
           "`pip install torch==2.13.0 && pip install -e .` in the checkout (torch first, so pip does not pull "
           "another build).")
CITATION = """If you use BrainDINO, cite the paper (arXiv 2604.27277; see the arXiv page for its authors) and DINOv3,
whose self-distillation recipe it follows:

```bibtex
@misc{braindino2026,
  title         = {BrainDINO},
  year          = {2026},
  eprint        = {2604.27277},
  archivePrefix = {arXiv},
}
@misc{simeoni2025dinov3,
  title         = {{DINOv3}},
  author        = {Sim{\\'e}oni, Oriane and others},
  year          = {2025},
  eprint        = {2508.10104},
  archivePrefix = {arXiv},
}
```"""

# Weights started from natural-image DINOv3 are under Meta's DINOv3 License, which is not an SPDX licence.
DINOV3_LICENSE = {"license": "other", "license_name": "dinov3-license",
                  "license_link": "https://ai.meta.com/resources/models-and-libraries/dinov3-license/"}


def backbone_license(spec: str | None) -> dict:
    """The licence metadata a head inherits from its backbone: a folder's own card where it has one, DINOv3's for
    `dinov3:` weights, Apache-2.0 for `dinov2:`, MIT for random-initialised baselines and cards without one."""
    kind = (spec or "").partition(":")[0]
    if kind == "dinov3":
        return dict(DINOV3_LICENSE)
    if kind == "dinov2":
        return {"license": "apache-2.0"}
    card = Path(spec) / "README.md" if spec and kind != "random" else None
    if card is not None and card.exists():
        data = ModelCard.load(card).data.to_dict()
        return {key: data[key] for key in ("license", "license_name", "license_link") if data.get(key)} or {"license": "mit"}
    return {"license": "mit"}


def hub_model_id(spec: str | None) -> str | None:
    """The Hub id a model spec names (`owner/name`, also behind `dinov3:` / `dinov2:`), for `base_model`; None for
    local folders, presets and random-initialised baselines, which the Hub cannot link to."""
    kind, _, rest = (spec or "").partition(":")
    spec = rest if kind in ("dinov3", "dinov2") else spec
    if not spec or kind == "random" or Path(spec).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        return None
    return spec


METRIC_LIBRARIES = {
    "classification": "scikit-learn (AUROC, accuracy, balanced accuracy, macro-F1)",
    "regression": "scikit-learn (MAE, RMSE, R²) and SciPy (Pearson r)",
    "survival": "lifelines (Harrell's C-index)",
    "segmentation": "MONAI (Dice, HD95 in mm, BraTS regions; BraTS 2023 conventions for empty masks)",
}
# Shown in the table, in this order, where present.
TABLE_METRICS = ["mae", "rmse", "pearson_r", "r2", "balanced_accuracy", "auroc", "accuracy", "macro_f1", "c_index",
                 "dice_whole_tumor", "dice_tumor_core", "dice_enhancing_tumor", "hd95_whole_tumor"]


def results_table(results: dict) -> str:
    """Markdown table: one row per label fraction, `mean ± std (n)` over folds and seeds."""
    first = next(iter(results["summary"].values()))
    metrics = [name for name in TABLE_METRICS if name in first]
    lines = ["| labels | " + " | ".join(metrics) + " |", "| --- |" + " --- |" * len(metrics)]
    for fraction, summary in results["summary"].items():
        cells = [f"{summary[name]['mean']:.3f} ± {summary[name]['std']:.3f} (n={summary[name]['n']})"
                 if summary[name]["n"] else "undefined" for name in metrics]
        lines.append(f"| {float(fraction):.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _head_compute(results: dict, exported: dict) -> str:
    return (f"The frozen backbone encoded on {results['hardware']} ({results['backbone_dtype']}); the encoding and "
            f"{len(results['runs'])} head run(s) took {results['seconds']:.0f} s, the exported head {exported['epochs']} "
            f"epochs in {exported['train_seconds']:.1f} s from the feature cache.")


def _head_card_data(results: dict, model_name: str) -> ModelCardData:
    """The card's metadata: tags, licence, base model, and the largest label fraction's scores as Hub eval results."""
    served = HEAD_TASKS[results["task"]]
    largest = max(results["summary"], key=float)
    dataset = "BrainDINO synthetic corpus (SYNTHETIC)" if results["synthetic_data"] else Path(results["labels"]).parent.name
    hub_task = served.hub_task
    eval_results = [
        EvalResult(task_type=hub_task, task_name=served.name,
                   dataset_type="braindino-synthetic" if results["synthetic_data"] else "custom",
                   dataset_name=dataset, metric_type=name, metric_value=round(values["mean"], 4),
                   metric_name=f"{name} ({float(largest):.0%} of labels, mean of {values['n']} runs)")
        for name, values in results["summary"][largest].items()
        if name in TABLE_METRICS and values["n"] > 0
    ]
    tags = ["braindino", "brain-mri", "medical-imaging", "nifti", "frozen-backbone", results["task"], served.name]
    if hub_task == "other":  # the Hub has no image-regression task: regression and survival heads carry a tag
        tags.append("regression")
    if results["synthetic_data"]:
        tags.append("synthetic-data")
    base_model = hub_model_id(results["config"].get("backbone"))
    return ModelCardData(library_name="transformers", tags=tags, model_name=model_name, pipeline_tag=hub_task,
                         eval_results=eval_results, **({"base_model": base_model} if base_model else {}),
                         **backbone_license(results["config"].get("backbone")))


def head_card(results: dict, model_id: str = "path/to/this/folder", pipeline_code: bool = False) -> ModelCard:
    """The card of an exported head; every number comes from `results` (the `train-head` results JSON).
    `pipeline_code`: whether the folder carries the pipeline code (`custom_pipelines`), which decides how to call it."""
    served = HEAD_TASKS[results["task"]]
    pipeline_task, model_class, auto_class = served.name, served.model_class.__name__, served.auto_class.__name__
    model_name = f"BrainDINO {results['task']} head: {results['target']}"
    card_data = _head_card_data(results, model_name)
    runs = results["runs"]
    exported = next((run for run in runs if results["exported_model"] and
                     f"fraction{run['label_fraction']:g}-fold{run['fold']}-seed{run['seed']}" == results["exported_model"]["run"]), runs[0])
    config = results["config"]
    backbone_note = (
        "The backbone is randomly initialised (a baseline), not a pretrained BrainDINO."
        if results["random_init"] else
        f"Backbone: {results['backbone']}. A backbone started from natural-image DINOv3 weights carries the DINOv3 License."
    )
    template = resources.files("braindino.model_cards").joinpath("head.md").read_text()
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_id=model_id,
        model_name=model_name,
        model_class=model_class,
        auto_class=auto_class,
        pipeline_task=pipeline_task,
        summary=(f"A {results['task']} head predicting `{results['target']}` from "
                 f"{', '.join(results['inputs'])} on a frozen BrainDINO backbone ({results['backbone']})."),
        synthetic_data=results["synthetic_data"],
        contrasts=results["inputs"],
        results_table=results_table(results),
        protocol=results["protocol"],
        metric_libraries=METRIC_LIBRARIES[results["task"]],
        training_data=(f"{results['samples']} subjects from `{Path(results['labels']).name}`"
                       + (" — SYNTHETIC subjects built on MNI152 anatomy (`braindino synth`), not real patients."
                          if results["synthetic_data"] else ".")),
        procedure=(f"Backbone frozen; head trained with AdamW (lr {config['learning_rate']}, weight decay "
                   f"{config['weight_decay']}) on standardised embeddings (the training split's per-dimension mean and std), "
                   f"the epoch selected by the task's metric on a validation split (lr halved on plateau, early stop "
                   f"after {config['patience']} epochs without improvement, not before epoch {config['min_epochs']}, "
                   f"at most {config['max_epochs']}); label fractions {config['label_fractions']}, "
                   f"{config['folds']} fold(s), seeds {config['seeds']}. The exported weights are the run with "
                   f"{exported['label_fraction']:.0%} of labels, fold {exported['fold']}, seed {exported['seed']} "
                   f"({exported['train']} training subjects)."),
        train_size=exported["train"],
        backbone_note=backbone_note,
        compute=_head_compute(results, exported),
        pipeline_code=pipeline_code,
        install=INSTALL,
        citation=CITATION,
    )


def write_head_card(results: dict, folder: str | Path, model_id: str | None = None) -> Path:
    path = Path(folder) / "README.md"
    head_card(results, model_id or str(folder), pipeline_code=carries_pipeline_code(folder)).save(path)
    return path


def _time_limit_note(run: dict) -> str:
    """A run cut short by `time_limit_minutes` says so: its schedules stopped part-way, not where the recipe ends."""
    if not run.get("time_limit_reached"):
        return ""
    recipe = run["recipe"]
    return (f" (stopped by its time limit of {recipe['time_limit_minutes']:g} min; the recipe's schedules run to "
            f"{recipe['iterations']})")


def _loss_terms(run: dict) -> str:
    """The loss terms the run trained (`run["loss_terms"]`: name → weight, none at weight 0), with their weights."""
    details = {"DINO": f" (CLS, {run['recipe']['centering'].replace('_', '-')} centring)", "iBOT": " (masked patches)"}
    return " + ".join(f"{name}{details.get(name, '')} × {weight:g}" for name, weight in run["loss_terms"].items())


def _augmentation(recipe: dict) -> str:
    probability = recipe["intensity_augment_probability"]
    return f"intensity augmentation with probability {probability:g}" if probability else "no intensity augmentation"


def backbone_card(run: dict, model_id: str = "path/to/this/folder") -> ModelCard:
    """The card of a pretrained backbone, from a pretraining run's facts (`run`: the recipe as a dict, the loss terms
    it trained, the model config, the iterations, minutes and processes, the losses, the corpus manifest)."""
    recipe, model_config, manifest = run["recipe"], run["model_config"], run["manifest"]
    synthetic = bool(manifest.get("synthetic_sources")) and set(manifest["synthetic_sources"]) >= set(manifest["sources"])
    init = recipe.get("init_from")
    init_format = recipe.get("init_format", "braindino")
    if init and init_format == "dinov3":
        licence, licence_metadata = ("Started from natural-image DINOv3 weights, so these weights are under the DINOv3 "
                                     "License (Meta); the code is MIT."), dict(DINOV3_LICENSE)
    elif init and init_format == "dinov2":
        licence, licence_metadata = "Started from DINOv2 weights (Apache-2.0); the code is MIT.", {"license": "apache-2.0"}
    else:
        licence, licence_metadata = "Pretrained from scratch with this package; weights and code under MIT.", {"license": "mit"}
    tags = ["braindino", "brain-mri", "medical-imaging", "nifti", "self-supervised", "dinov3-style"]
    if synthetic:
        tags.append("synthetic-data")
    losses = run["losses"]
    model_name = f"BrainDINO-{recipe['preset']} backbone"
    base_model = hub_model_id(init)
    card_data = ModelCardData(library_name="transformers", tags=tags, model_name=model_name,
                              pipeline_tag="image-feature-extraction", **({"base_model": base_model} if base_model else {}),
                              **licence_metadata)
    template = resources.files("braindino.model_cards").joinpath("backbone.md").read_text()
    sources = ", ".join(f"`{name}` ({counts['volumes']} volumes, {counts['slices']} slices)"
                        for name, counts in manifest["sources"].items())
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_id=model_id,
        model_name=model_name,
        synthetic=synthetic,
        size=recipe["global_crop_size"],
        summary=(f"A DINOv3-style ViT over 2D axial brain-MRI slices (the EMA teacher of a BrainDINO pretraining run), "
                 f"{run['num_parameters'] / 1e6:.1f} M parameters, to be used frozen with small task heads."),
        architecture=(f"ViT, patch {model_config['patch_size']}, width {model_config['hidden_size']}, "
                      f"{model_config['num_hidden_layers']} blocks, {model_config['num_attention_heads']} heads, CLS + "
                      f"{model_config['num_register_tokens']} registers, 2D RoPE (base {model_config['rope_theta']:g}), "
                      f"LayerScale {model_config['layerscale_value']:g}, {model_config['num_channels']} input channels "
                      "(the grey slice repeated), z-scored intensities."),
        pretraining=(f"{_loss_terms(run)}; {_augmentation(recipe)}; {run['iterations']} iterations"
                     f"{_time_limit_note(run)} in "
                     f"{run['minutes']:.1f} min on {run['processes']} process(es) ({run['device']}), batch "
                     f"{recipe['batch_size']} per process, 2 global crops of {recipe['global_crop_size']} px + "
                     f"{recipe['local_crops_number']} local crops of {recipe['local_crop_size']} px; loss "
                     f"{losses['first']:.3f} → {losses['last_10_mean']:.3f} (mean of the last 10 iterations). "
                     f"Initialisation: {init + f' ({init_format})' if init else 'random'}."),
        training_data=(f"{manifest['volumes']} volumes → {manifest['slices']} axial slices of {manifest['slice_size']} px "
                       f"from {sources}" + (" — SYNTHETIC, not real patients." if synthetic else ".")),
        licence=licence,
        compute=(f"{run['iterations']} iterations in {run['minutes']:.1f} min on {run['processes']} process(es), "
                 f"{run.get('hardware', run['device'])}, mixed precision `{recipe['mixed_precision']}`."),
        install=INSTALL,
        citation=CITATION,
        scale_note=("Minutes of CPU pretraining on a small corpus: features are far from the paper's 6.6 million slices."
                    if run["minutes"] < 120 else "Check the training data above against your scanners and populations."),
    )
