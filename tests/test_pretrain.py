"""Pretraining: the model and its export, schedules and optimiser policy, and the real loop as real
processes — exact resume after SIGKILL, and a 2-process `accelerate launch`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForPreTraining

from braindino import BrainDinoConfig, BrainDinoForPreTraining, BrainDinoModel
from braindino.train.data.slice_corpus import prepare_corpus
from braindino.train.pretraining.param_groups import parameter_groups
from braindino.train.pretraining.schedules import cosine_schedule, linear_then_constant
from braindino.train.data.synthetic import write_synthetic_corpus

MICRO_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
               "head_hidden_size": 64, "head_bottleneck_size": 32, "num_prototypes": 64}


def test_pretraining_model_round_trip_and_backbone_export(tmp_path):
    config = BrainDinoConfig(**MICRO_MODEL)
    model = BrainDinoForPreTraining(config).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    masks = torch.tensor([[True, False, False, True], [False, False, False, False]])
    output = model(pixel_values, bool_masked_pos=masks, patch_positions=masks)
    assert output.cls_logits.shape == (2, 64) and output.masked_patch_logits.shape == (2, 64)
    assert output.cls_logits.abs().max() <= 1.0 + 1e-5  # cosine scores against unit prototypes
    model.save_pretrained(tmp_path / "pretraining")
    reloaded = AutoModelForPreTraining.from_pretrained(tmp_path / "pretraining").eval()
    torch.testing.assert_close(reloaded(pixel_values).cls_logits, model(pixel_values).cls_logits)
    model.save_backbone(tmp_path / "backbone")
    backbone = AutoModel.from_pretrained(tmp_path / "backbone").eval()
    assert isinstance(backbone, BrainDinoModel)
    torch.testing.assert_close(backbone(pixel_values).pooler_output, output.cls_tokens)


def test_schedules_are_plain_arrays_with_warmup_and_cosine():
    schedule = cosine_schedule(1.0, 0.1, iterations=20, warmup_iterations=5)
    assert len(schedule) == 20 and schedule[0] == 0.0 and schedule[5] == pytest.approx(1.0)
    assert schedule[-1] == pytest.approx(0.1) and np.all(np.diff(schedule[5:]) <= 1e-12)
    temperature = linear_then_constant(0.04, 0.07, iterations=10, ramp_iterations=4)
    np.testing.assert_allclose(temperature, [0.04, 0.0475, 0.055, 0.0625] + [0.07] * 6)


def test_parameter_groups_follow_the_policy():
    model = BrainDinoForPreTraining(BrainDinoConfig(**MICRO_MODEL))
    groups = parameter_groups(model, num_layers=2, layerwise_decay=0.5, patch_embed_lr_multiplier=0.2)
    by_name = {name: group for group in groups for name in group["names"]}
    assert by_name["braindino.embeddings.patch_embeddings.weight"]["lr_multiplier"] == pytest.approx(0.5**3 * 0.2)
    assert by_name["braindino.layers.0.attention.qkv.weight"]["lr_multiplier"] == pytest.approx(0.5**2)
    assert by_name["braindino.layers.1.mlp.up_proj.weight"]["lr_multiplier"] == pytest.approx(0.5)
    assert by_name["dino_head.mlp.0.weight"]["lr_multiplier"] == 1.0
    for name in ("braindino.layers.0.norm1.weight", "braindino.layers.0.layer_scale1.gamma", "braindino.embeddings.cls_token",
                 "braindino.layers.1.mlp.up_proj.bias", "braindino.layernorm.weight"):
        assert by_name[name]["wd_multiplier"] == 0.0, name
    assert by_name["braindino.layers.0.attention.qkv.weight"]["wd_multiplier"] == 1.0
    assert by_name["dino_head.prototypes"]["is_prototypes"] and not by_name["dino_head.mlp.0.weight"]["is_prototypes"]
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A micro recipe over a small synthetic corpus: 64 px slices, 32 px global and 16 px local crops."""
    root = tmp_path_factory.mktemp("pretrain")
    write_synthetic_corpus(root / "synthetic", subjects=2, seed=4)
    prepare_corpus([root / "synthetic"], root / "corpus", size=64, progress=False)
    config = {
        "corpus": str(root / "corpus"), "preset": "tiny", "model_overrides": MICRO_MODEL,
        "iterations": 30, "iterations_per_epoch": 10, "batch_size": 4, "warmup_epochs": 1,
        "teacher_temperature_warmup_epochs": 1, "freeze_prototypes_epochs": 0.5, "global_crop_size": 32,
        "local_crop_size": 16, "local_crops_number": 2, "shuffle_buffer": 32, "num_workers": 1,
        "checkpoint_every": 5, "tracker": None,
    }
    path = root / "recipe.json"
    path.write_text(json.dumps(config))
    return path


def _command(recipe, output_dir, *extra):
    return [sys.executable, "-m", "braindino.train.pretraining", "--config", str(recipe), "--output-dir", str(output_dir), *extra]


def _losses(output_dir) -> dict[int, dict]:
    records = {}
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["iteration"]] = record  # a resumed run rewrites iterations after its checkpoint
    return records


def test_resume_after_sigkill_gives_the_same_losses(recipe, tmp_path):
    reference = subprocess.run(_command(recipe, tmp_path / "reference"), capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(_command(recipe, killed_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    latest = killed_dir / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.exists() and json.loads(latest.read_text())["iteration"] >= 5):
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = json.loads(latest.read_text())["iteration"]
    assert 5 <= killed_at < 30, "the run must be killed part-way"
    assert not (killed_dir / "final").exists()

    resumed = subprocess.run(_command(recipe, killed_dir), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from" in resumed.stdout + resumed.stderr
    expected, got = _losses(tmp_path / "reference"), _losses(killed_dir)
    assert sorted(got) == list(range(1, 31))
    for iteration in range(killed_at + 1, 31):
        for name in ("loss", "dino", "ibot", "koleo"):
            assert got[iteration][name] == pytest.approx(expected[iteration][name], rel=1e-5, abs=1e-6), (iteration, name)
    final_reference = BrainDinoForPreTraining.from_pretrained(tmp_path / "reference" / "final" / "teacher")
    final_resumed = BrainDinoForPreTraining.from_pretrained(killed_dir / "final" / "teacher")
    for (name, a), (_, b) in zip(final_reference.state_dict().items(), final_resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert len(list((killed_dir / "checkpoints").glob("iter-*"))) == 2  # keep_checkpoints
    assert not list(killed_dir.rglob("*.tmp"))


def test_two_process_accelerate_launch_trains_like_one_process(recipe, tmp_path):
    """2 processes x batch 2 against 1 process x batch 4 (the same global batch). The samples differ (each
    rank streams its own share), so the losses are compared as means over the run: within 10 %."""
    one = subprocess.run(_command(recipe, tmp_path / "one", "--iterations", "10", "--no-resume"),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "braindino.train.pretraining", "--config", str(recipe), "--output-dir", str(tmp_path / "two"),
              "--iterations", "10", "--batch-size", "2"]
    two = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["batch_size"] == 2
    state = json.loads((tmp_path / "two" / "checkpoints" / "latest.json").read_text())
    assert set(state["data_positions"]) == {"0", "1"}  # both ranks recorded where they are in the stream
    one_losses, two_losses = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(two_losses) == list(range(1, 11))
    mean_one = np.mean([record["dino"] + record["ibot"] for record in one_losses.values()])
    mean_two = np.mean([record["dino"] + record["ibot"] for record in two_losses.values()])
    assert np.isfinite(mean_two) and abs(mean_two - mean_one) / mean_one < 0.10
    assert (tmp_path / "two" / "final" / "backbone" / "model.safetensors").exists()


def test_pretraining_starts_from_dinov3_weights(tmp_path):
    """`--init-format dinov3` (the base recipe): the student's backbone equals the DINOv3 source, the heads
    take the preset's sizes."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from braindino.train.pretraining.recipe import PretrainConfig
    from braindino.train.pretraining.self_distillation import build_student

    source = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_register_tokens=4, layerscale_value=0.5)).eval()
    source.save_pretrained(tmp_path / "dinov3")
    model = build_student(PretrainConfig(preset="tiny", init_from=str(tmp_path / "dinov3"), init_format="dinov3")).eval()
    pixel_values = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        difference = (model.braindino(pixel_values).last_hidden_state - source(pixel_values).last_hidden_state).abs().max()
    assert difference <= 1e-4
    assert model.config.num_prototypes == BrainDinoConfig.from_preset("tiny").num_prototypes


def test_knn_monitor_and_backbone_card_of_a_pretraining_run(recipe, tmp_path):
    corpus = json.loads(recipe.read_text())["corpus"]
    sequences = Path(corpus).parent / "synthetic" / "sequences.csv"
    result = subprocess.run(_command(recipe, tmp_path / "run", "--iterations", "10", "--knn-labels", str(sequences),
                                     "--knn-every", "5"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = _losses(tmp_path / "run")
    assert [i for i, record in records.items() if "knn_balanced_accuracy" in record] == [5, 10]
    assert all(0.0 <= records[i]["knn_balanced_accuracy"] <= 1.0 for i in (5, 10))
    card = (tmp_path / "run" / "final" / "backbone" / "README.md").read_text()  # generated from this run's facts
    assert "10 iterations" in card and "SYNTHETIC" in card and "not for clinical decisions" in card
    assert "license: mit" in card and "pipeline_tag: image-feature-extraction" in card
