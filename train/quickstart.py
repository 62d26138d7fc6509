"""`braindino quickstart`: the main job, end to end on the embedded SYNTHETIC data, with a short report.

Synthetic corpus → slice corpus → one epoch of the streaming multi-crop loader (with a picture of the crops) →
a time-bounded pretraining of the tiny backbone → frozen features of held-out scans and of the real MNI152
template → a brain-age head and a tumour-segmentation head on that backbone (`train-head`) → every pipeline on a
held-out scan (the mask written as NIfTI on the scan's grid) → `space_models.json` naming these models for the Space.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import torch

from braindino import BrainDinoImageProcessor, BrainDinoModel
from braindino.example_data import write_mni152_t1
from braindino.pipelines import SPACE_ENTRIES
from braindino.pipelines.predict_files import predict_files
from braindino.train.data.multicrop import MultiCropConfig
from braindino.train.data.preview import save_crop_preview
from braindino.train.data.slice_corpus import prepare_corpus
from braindino.train.data.stream import multicrop_loader, slice_stream
from braindino.train.data.synthetic import CONTRASTS, write_synthetic_corpus
from braindino.train.encoding.backbones import load_backbone
from braindino.train.encoding.feature_cache import extract_features
from braindino.train.evaluation.figures import loss_curve_figure, segmentation_figure
from braindino.train.evaluation.head_runs import train_heads
from braindino.train.evaluation.metrics import TRIVIAL_BASELINES
from braindino.train.heads.config import HeadTrainingConfig
from braindino.train.pretraining.loop import UNIFORM_TARGETS, pretrain, read_metrics
from braindino.train.pretraining.recipe import PretrainConfig

TOTAL_STEPS = 7
# The CPU recipe whose DINO branch learns in minutes (docs/research/cpu-pretraining.md); `tiny` is DINOv3's
# initialisation and weights.
QUICKSTART_RECIPE = "tiny-layerscale1-nokoleo-noaug"


def _step(number: int, total: int, text: str) -> float:
    print(f"[{number}/{total}] {text}", flush=True)
    return time.perf_counter()


def _data_stages(out_dir: Path, subjects: int, held_out: int, seed: int, workers: int, timings: dict) -> dict:
    """Steps 1-3: the SYNTHETIC corpus (and held-out subjects), the slice corpus, one epoch of the multi-crop loader."""
    started = _step(1, TOTAL_STEPS, f"writing {subjects} + {held_out} held-out synthetic subjects on MNI152 anatomy")
    write_synthetic_corpus(out_dir / "synthetic", subjects, seed=seed, workers=workers)
    write_synthetic_corpus(out_dir / "synthetic-heldout", held_out, seed=seed, workers=workers, first_index=subjects)
    timings["synthetic corpus"] = time.perf_counter() - started

    started = _step(2, TOTAL_STEPS, "building the slice corpus (Parquet shards)")
    manifest = prepare_corpus([out_dir / "synthetic"], out_dir / "corpus", workers=workers)
    timings["prepare-data"] = time.perf_counter() - started

    started = _step(3, TOTAL_STEPS, "one epoch of the streaming multi-crop loader")
    torch.manual_seed(seed)
    crops = MultiCropConfig()
    loader = multicrop_loader(slice_stream(out_dir / "corpus", seed=seed), batch_size=32, config=crops,
                              num_workers=workers, seed=seed)
    samples = 0
    for batch_index, batch in enumerate(loader):
        if batch_index == 0:
            save_crop_preview(batch, out_dir / "crops.png")
        samples += batch["batch_size"]
    timings["loader epoch"] = time.perf_counter() - started
    return {"manifest": manifest, "loader_samples": samples, "crops": crops}


def run_quickstart(out_dir: str | Path, subjects: int = 24, held_out: int = 2, seed: int = 0, workers: int = 2,
                   pretrain_minutes: float = 3.0, device: str = "auto", dtype: str = "auto",
                   recipe: str = QUICKSTART_RECIPE) -> Path:
    """Run every stage into `out_dir`; return the report's path. `recipe`: the pretraining recipe (a bundled name or a
    JSON file); `device`/`dtype`: where and in which precision the frozen backbone encodes for the features, heads and
    pipelines (`braindino.precision`)."""
    out_dir = Path(out_dir)
    timings = {}
    print(f"BrainDINO quickstart on SYNTHETIC data → {out_dir} (about {pretrain_minutes + 2.5:.0f}-{pretrain_minutes + 7.5:.0f} minutes on a 2-core CPU)",
          flush=True)
    facts = _data_stages(out_dir, subjects, held_out, seed, workers, timings)

    config = PretrainConfig.load(recipe, corpus=str(out_dir / "corpus"), output_dir=str(out_dir / "pretrain"),
                                 time_limit_minutes=pretrain_minutes, num_workers=workers, seed=seed, tracker=None)
    terms = " + ".join(config.trained_loss_terms())
    started = _step(4, TOTAL_STEPS, f"pretraining the {recipe} recipe for at most {pretrain_minutes:g} min ({terms})")
    facts["trained"] = trained = pretrain(config, resume=False)
    facts["recipe"] = recipe
    facts["records"] = read_metrics(out_dir / "pretrain")
    facts["losses"] = [record["loss"] for record in facts["records"]]
    timings["pretraining"] = time.perf_counter() - started

    started = _step(5, TOTAL_STEPS, "frozen features of held-out scans and the MNI152 template, pretrained backbone")
    held_out_scans = sorted((out_dir / "synthetic-heldout").glob(f"*/*_{CONTRASTS[0]}.nii.gz"))
    facts["backbone"] = backbone = load_backbone(trained["backbone"], num_slices=128, device=device, dtype=dtype)
    facts["features"] = extract_features(held_out_scans + [write_mni152_t1(out_dir / "inputs")], backbone, out_dir / "features",
                                         workers=workers)
    timings["feature extraction"] = time.perf_counter() - started

    started = _step(6, TOTAL_STEPS, "task heads on the frozen backbone: brain age (T1) and tumour segmentation (FLAIR)")
    facts["heads"] = heads = train_quickstart_heads(out_dir, trained["backbone"], seed, device=device, dtype=dtype)
    timings["task heads"] = time.perf_counter() - started

    started = _step(7, TOTAL_STEPS, "pipelines on a held-out scan (NIfTI in, results and mask NIfTI out)")
    subject_dir = held_out_scans[0].parent
    facts["predictions"] = run_quickstart_pipelines(out_dir, heads, trained["backbone"], subject_dir, device, dtype)
    facts["pictures"] = report_pictures(out_dir, trained["backbone"], heads, subject_dir)
    facts["space_config"] = write_space_config(out_dir, heads, trained["backbone"], next(subject_dir.glob("*_flair.nii.gz")))
    timings["pipelines"] = time.perf_counter() - started
    report = write_report(out_dir, subjects, facts, timings)
    print(f"done: {report}")
    print(f"open the Space on these models: BRAINDINO_SPACE_CONFIG={facts['space_config']} python spaces/app.py "
          "(then http://127.0.0.1:7860)")
    return report


def dino_branch_line(records: list[dict]) -> str:
    """What the last pretraining records say of the DINO branch: its loss against log K, the teacher's CLS target
    entropy, and the two CLS spreads that tell a lagging teacher from a collapsed student."""

    def mean(key: str) -> float:  # a NaN step is logged as None
        values = [record[key] for record in records if record.get(key) is not None]
        return sum(values) / len(values) if values else math.nan

    entropy = mean("teacher_cls_entropy") / mean("log_num_prototypes")
    lagging = mean("teacher_cls_spread") < 0.1 * mean("student_cls_spread")
    state = "informative targets" if entropy < UNIFORM_TARGETS else "uniform targets, so the DINO loss teaches nothing" + (
        ": the EMA teacher's CLS tokens lag the student's (docs/research/cpu-pretraining.md, 'Where the DINO branch of "
        "`tiny` stops')" if lagging else "")
    return (f"- DINO branch (means of the last {len(records)} iterations): loss {mean('dino'):.3f} against log K = "
            f"{mean('log_num_prototypes'):.3f}, teacher CLS target entropy {entropy:.3f} log K, CLS spread across the batch "
            f"teacher {mean('teacher_cls_spread'):.3f} / student {mean('student_cls_spread'):.3f}: {state}")


def write_report(out_dir: Path, subjects: int, facts: dict, timings: dict) -> Path:
    """`report.md` (counts, losses, scores, timings, pictures) and `timings.json`."""
    manifest, crops, losses, trained = facts["manifest"], facts["crops"], facts["losses"], facts["trained"]
    lines = [
        "# BrainDINO quickstart report",
        "",
        "All data here is SYNTHETIC (MNI152 anatomy, randomly deformed) except the MNI152 template itself.",
        "",
        f"- synthetic corpus: {subjects} subjects x {len(CONTRASTS)} contrasts, labels in `synthetic/labels.csv`",
        f"- slice corpus: {manifest['volumes']} volumes → {manifest['slices']} slices in `corpus/`",
        f"- one loader epoch: {facts['loader_samples']} multi-crop samples (2 x {crops.global_crop_size} px + "
        f"{crops.local_crops_number} x {crops.local_crop_size} px); first sample: `crops.png`",
        f"- pretraining (recipe `{facts['recipe']}`): {trained['iterations']} iterations in {timings['pretraining'] / 60:.1f} min, loss "
        f"{losses[0]:.3f} → {losses[-1]:.3f} (mean of the last 10: {sum(losses[-10:]) / len(losses[-10:]):.3f}); "
        f"backbone in `pretrain/final/backbone`, heads in `pretrain/final/teacher`",
        dino_branch_line(facts["records"][-10:]),
        f"- features ({facts['backbone'].description}, on {facts['backbone'].device} in "
        f"{facts['features']['dtype']}): "
        + ", ".join(f"`{Path(volume['features']).name}` ({volume['num_slices']} slices)" for volume in facts["features"]["volumes"]),
        *head_report_lines(facts["heads"]),
        *[f"- `{task}` on `{name}`: {summary}" for task, (name, summary) in facts["predictions"].items()],
        "",
        "| stage | seconds |",
        "| --- | --- |",
        *[f"| {stage} | {seconds:.1f} |" for stage, seconds in timings.items()],
        "",
        "![multi-crop views](crops.png)",
        "",
        *[f"![{name}]({path.name})" for name, path in facts["pictures"].items()],
        "",
        f"Open the Space on these models: `BRAINDINO_SPACE_CONFIG={facts['space_config']} python spaces/app.py` (from the "
        "repository root), then http://127.0.0.1:7860.",
    ]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    return report


def train_quickstart_heads(out_dir: Path, backbone: str, seed: int, device: str = "auto", dtype: str = "auto") -> dict[str, dict]:
    """A brain-age head (all labels and 50 %, 3 seeds: with 6 test subjects one seed is noise) and, where at least 3
    subjects have a tumour, a segmentation head (one seed: the slow task)."""
    labels = out_dir / "synthetic" / "labels.csv"
    common = dict(labels=str(labels), backbone=backbone, num_slices=32, device=device, dtype=dtype)
    heads = {"brain age": train_heads(HeadTrainingConfig(task="regression", inputs=["t1"], target="age",
                                                         label_fractions=[0.5, 1.0], seeds=[seed, seed + 1, seed + 2],
                                                         output_dir=str(out_dir / "heads" / "brain-age"), **common))}
    with open(labels) as handle:
        tumour_subjects = sum(1 for row in csv.DictReader(handle) if row["seg"])
    if tumour_subjects >= 3:
        heads["tumour segmentation"] = train_heads(HeadTrainingConfig(
            task="segmentation", inputs=["flair"], target="seg", max_epochs=8,
            seeds=[seed], output_dir=str(out_dir / "heads" / "tumour-segmentation"), **common))
    else:
        print(f"  only {tumour_subjects} synthetic subjects have a tumour: no segmentation head (use --subjects 8 or more)")
    return heads


def head_report_lines(heads: dict[str, dict]) -> list[str]:
    """One line per head: its score per label fraction (training subjects), next to the trivial baseline on the
    same held-out subjects where the task has one."""
    lines = []
    for name, results in heads.items():
        metric = results["primary_metric"]
        baseline_metric, baseline_name = TRIVIAL_BASELINES.get(metric, (None, None))
        scores = []
        for fraction, summary in results["summary"].items():
            text = (f"{float(fraction):.0%} of labels ({'/'.join(map(str, results['training_subjects'][fraction]))} "
                    f"training subjects): {summary[metric]['mean']:.3f} ± {summary[metric]['std']:.3f} over "
                    f"{summary[metric]['n']} seed(s)")
            if baseline_metric in summary:
                text += f" against {summary[baseline_metric]['mean']:.3f} for {baseline_name}"
            scores.append(text)
        scores += [f"{float(fraction):.0%} of labels: {message}" for fraction, message in results["too_few_labels"].items()]
        test_subjects = results["runs"][0]["test"] if results["runs"] else 0
        lines.append(f"- {name} head ({results['samples']} SYNTHETIC subjects, {test_subjects} held out for testing): "
                     f"{metric} " + "; ".join(scores) + f"; run `{results['exported_model']['run']}` exported to "
                     f"`{results['exported_model']['folder']}` with its model card")
    return lines


def run_quickstart_pipelines(out_dir: Path, heads: dict[str, dict], backbone: str, subject_dir: Path,
                             device: str = "auto", dtype: str = "auto") -> dict:
    """Every pipeline whose head exists, on one held-out subject, through `braindino predict`'s code path."""
    scans = {contrast: str(next(subject_dir.glob(f"*_{contrast}.nii.gz"))) for contrast in ("t1", "flair")}
    jobs = {"brain-age": (heads["brain age"]["exported_model"]["folder"], scans["t1"]),
            "brain-mri-feature-extraction": (backbone, scans["t1"])}
    if "tumour segmentation" in heads:
        jobs["brain-tumor-segmentation"] = (heads["tumour segmentation"]["exported_model"]["folder"], scans["flair"])
    summaries = {}
    for task, (model, scan) in jobs.items():
        written = predict_files(task, model, [scan], out_dir / "predictions" / task, device=device, dtype=dtype)["written"]
        result = json.loads(Path(written[0]).read_text())
        if task == "brain-age":
            text = f"predicted age {result['result']['age']:.1f} years from {result['result']['num_slices']} slices"
        elif task == "brain-tumor-segmentation":
            volumes = result["result"]["volumes_ml"]
            text = (f"whole tumour {volumes['whole_tumor']:.1f} ml; mask `{Path(result['mask']).relative_to(out_dir)}` "
                    "on the scan's own grid")
        else:
            text = f"a {len(result['result']['embedding'])}-dimensional volume embedding"
        summaries[task] = (Path(scan).name, text)
    return summaries


def report_pictures(out_dir: Path, backbone: str, heads: dict[str, dict], subject_dir: Path) -> dict[str, Path]:
    """The loss curve, and (with a segmentation head) the held-out slice with the most tumour: predicted labels,
    the reference outline and the patch-feature PCA map."""
    pictures = {"pretraining loss": loss_curve_figure(out_dir / "pretrain" / "metrics.jsonl", out_dir / "loss_curve.png")}
    masks = sorted((out_dir / "predictions" / "brain-tumor-segmentation").glob("*_seg.nii.gz"))
    if masks:
        scan = next(subject_dir.glob("*_flair.nii.gz"))
        reference = next(subject_dir.glob("*_seg.nii.gz"), None)
        processor = BrainDinoImageProcessor.from_pretrained(heads["tumour segmentation"]["exported_model"]["folder"])
        pictures["segmentation and PCA"] = segmentation_figure(
            str(scan), str(masks[0]), str(reference) if reference else None, BrainDinoModel.from_pretrained(backbone).eval(),
            processor, out_dir / "segmentation.png")
    return pictures


def write_space_config(out_dir: Path, heads: dict[str, dict], backbone: str, example: Path) -> Path:
    """A `models.json` for the Space naming this run's models and a held-out SYNTHETIC example (absolute paths)."""
    folders = {results["task"]: results["exported_model"]["folder"] for results in heads.values()}
    folders[None] = backbone  # the feature-extraction entry takes any BrainDINO folder
    config = {key: str(Path(folders[task.head_task]).resolve()) if task.head_task in folders else None
              for key, task in SPACE_ENTRIES.items()}
    config["example"] = str(example.resolve())
    path = out_dir / "space_models.json"
    path.write_text(json.dumps(config, indent=2))
    return path.resolve()
