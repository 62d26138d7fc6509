"""Pretraining: the model and its export, schedules and optimiser policy, the `SelfDistillation` module's teacher
update and prototype freeze, and the real loop as real processes — exact resume after SIGKILL (both centrings),
Gram anchoring, the time limit, and `accelerate launch` with 2 processes (one step equals one process's)."""

import csv
import json
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from transformers import AutoModel, AutoModelForPreTraining

from braindino import BrainDinoConfig, BrainDinoForPreTraining, BrainDinoImageProcessor, BrainDinoModel
from braindino.train.data.slice_corpus import prepare_corpus
from braindino.train.pretraining.param_groups import parameter_groups
from braindino.train.pretraining.recipe import RECIPES_DIR, PretrainConfig
from braindino.train.pretraining.schedules import cosine_schedule, linear_then_constant
from braindino.train.data.synthetic import write_synthetic_corpus
from conftest import MICRO_MODEL, assert_hub_valid_card



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
    # against the same unmasked input: `output` had mask tokens in image 0, which LayerScale 1e-5 hides only to ~1e-5
    torch.testing.assert_close(backbone(pixel_values).pooler_output, model(pixel_values).cls_tokens)


def test_schedules_are_plain_arrays_with_warmup_and_cosine():
    schedule = cosine_schedule(1.0, 0.1, iterations=20, warmup_iterations=5)
    assert len(schedule) == 20 and schedule[0] == 0.0 and schedule[5] == pytest.approx(1.0)
    assert schedule[-1] == pytest.approx(0.1) and np.all(np.diff(schedule[5:]) <= 1e-12)
    temperature = linear_then_constant(0.04, 0.07, iterations=10, ramp_iterations=4)
    np.testing.assert_allclose(temperature, [0.04, 0.0475, 0.055, 0.0625] + [0.07] * 6)
    # a run shorter than its warm-up stops part-way up the ramp at DINOv3's slope (the tiny recipe: 200 iterations of
    # a 30-epoch teacher-temperature warm-up end at 0.044), never a ramp squeezed into the run
    np.testing.assert_allclose(linear_then_constant(0.04, 0.07, iterations=3, ramp_iterations=6), [0.04, 0.045, 0.05])
    np.testing.assert_allclose(cosine_schedule(1.0, 0.1, iterations=3, warmup_iterations=6), [0, 1 / 6, 2 / 6])


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
    # 2 volumes per shard file: enough files for every rank of the 2-process runs (each reads whole files)
    prepare_corpus([root / "synthetic"], root / "corpus", size=64, volumes_per_shard=2, progress=False)
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


@pytest.fixture(scope="module")
def softmax_recipe(recipe):
    """The micro recipe with DINO's softmax centring: its running centre is training state that a resume must restore."""
    path = recipe.parent / "recipe-softmax.json"
    path.write_text(json.dumps({**json.loads(recipe.read_text()), "centering": "softmax"}))
    return path


def _kill_after_a_checkpoint(command: list[str], output_dir: Path) -> int:
    """Start a 30-iteration run, SIGKILL its process group once a checkpoint of iteration 5 or later exists; the
    iteration of the newest checkpoint it left."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = output_dir / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.exists() and json.loads(latest.read_text())["iteration"] >= 5):
        time.sleep(0.01)
    # every process of the run at once, as a lost node: torchrun starts each rank in a session of its own, so killing
    # the launcher's process group would leave the ranks training on
    processes = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for member in processes:
        member.send_signal(signal.SIGKILL)
    assert not psutil.wait_procs(processes, timeout=60)[1], "a process of the run survived"
    killed_at = json.loads(latest.read_text())["iteration"]
    assert 5 <= killed_at < 30, "the run must be killed part-way"
    assert not (output_dir / "final").exists()
    return killed_at


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "softmax"])
def test_resume_after_sigkill_gives_the_same_losses(centering, recipe, softmax_recipe, tmp_path):
    recipe = softmax_recipe if centering == "softmax" else recipe
    reference = subprocess.run(_command(recipe, tmp_path / "reference"), capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    killed_at = _kill_after_a_checkpoint(_command(recipe, killed_dir), killed_dir)

    resumed = subprocess.run(_command(recipe, killed_dir), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
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


def _launch(*arguments) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no", *map(str, arguments)]


def test_two_process_launch_of_the_loop_checkpoints_both_ranks(recipe, tmp_path):
    """`accelerate launch --config_file <the shipped 1node-ddp.yaml> -m braindino.train.pretraining` with 2 processes
    (as the docs show it, with --num_processes overriding the file's 8) runs the whole loop: both ranks train, record
    their stream positions in the checkpoint, and rank 0 exports the backbone."""
    from braindino.train.pretraining.recipe import accelerate_config_path

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config_path("1node-ddp"),
              "--num_processes", "2", "--main_process_port", "0", "-m", "braindino.train.pretraining"]
    two = subprocess.run(list(map(str, [*launch, "--config", recipe, "--output-dir", tmp_path / "two", "--iterations", "10",
                                        "--batch-size", "2"])), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["batch_size"] == 2
    state = json.loads((tmp_path / "two" / "checkpoints" / "latest.json").read_text())
    assert set(state["data_positions"]) == {"0", "1"}  # both ranks recorded where they are in the stream
    assert sorted(_losses(tmp_path / "two")) == list(range(1, 11))
    assert (tmp_path / "two" / "final" / "backbone" / "model.safetensors").exists()


STEP_SCRIPT = Path(__file__).parent / "scripts" / "one_pretraining_step.py"


def test_one_step_on_two_processes_equals_one_process(tmp_path):
    """The same global batch of 8, split 4 + 4 over 2 processes or whole on 1: after one step of the loop's
    `train_step` the student's parameters agree. Adam's first step moves each weight by about ±lr, so a rank that
    skipped the gradient all-reduce (the control: one process on rank 0's half) is off by up to 2 lr; the two runs
    must agree to 1 % of lr (fp32 sums in another order, through Adam's first step)."""
    from safetensors.torch import load_file

    runs = {"one": [sys.executable, STEP_SCRIPT, tmp_path / "one.safetensors"],
            "half": [sys.executable, STEP_SCRIPT, tmp_path / "half.safetensors", "--share", "0"],
            "two": _launch(STEP_SCRIPT, tmp_path / "two.safetensors")}
    for name, command in runs.items():
        result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert result.returncode == 0, (name, result.stderr[-3000:])
    one, two, half = (load_file(tmp_path / f"{name}.safetensors") for name in ("one", "two", "half"))
    lr = 0.05 * (8 / 1024) ** 0.5  # the script's base lr, scaled by sqrt(global batch / 1024)
    worst = max((one[name] - two[name]).abs().max().item() for name in one)
    control = max((one[name] - half[name]).abs().max().item() for name in one)
    assert worst <= 0.01 * lr, worst
    assert control > 0.5 * lr, control  # the comparison can fail: without the all-reduce it does


def _student_after_steps(tmp_path, runs: dict) -> dict:
    """Run each command (the step script, 1 or 2 processes); the students' parameters after them, by run."""
    from safetensors.torch import load_file

    for name, command in runs.items():
        result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert result.returncode == 0, (name, result.stderr[-3000:])
        assert f"sharded: {'--sharding' in map(str, command)}" in result.stdout, name
    return {name: load_file(tmp_path / f"{name}.safetensors") for name in runs}


def _worst_difference(a: dict, b: dict) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


STEP_LR = 0.05 * (8 / 1024) ** 0.5  # the step script's base lr, scaled by sqrt(global batch / 1024)


def test_fsdp2_on_two_processes_gives_the_steps_of_ddp(tmp_path):
    """`--sharding fsdp2` on 2 CPU processes over gloo (every block, backbone and root of the student and both
    teachers sharded): after 3 steps of `train_step` on the same global batch from the same seed, the student's
    parameters, gathered from the shards, equal DDP's to 1 % of lr (measured: 3e-5 lr); the control, one process on
    rank 0's half of the batch, is off by more than half of lr (measured: 4 lr)."""
    runs = {"ddp": _launch(STEP_SCRIPT, tmp_path / "ddp.safetensors", "--steps", "3"),
            "fsdp2": _launch(STEP_SCRIPT, tmp_path / "fsdp2.safetensors", "--steps", "3", "--sharding", "fsdp2"),
            "half": [sys.executable, STEP_SCRIPT, tmp_path / "half.safetensors", "--share", "0", "--steps", "3"]}
    students = _student_after_steps(tmp_path, runs)
    assert _worst_difference(students["ddp"], students["fsdp2"]) <= 0.01 * STEP_LR
    assert _worst_difference(students["ddp"], students["half"]) > 0.5 * STEP_LR


def test_two_micro_batches_of_four_step_as_one_batch_of_eight(tmp_path):
    """`gradient_accumulation_steps` 2: the teacher's targets over all 8 images, the student's backward on 4 and 4,
    one optimiser step: the student equals one step on the batch of 8 to 1 % of lr (measured: 1e-4 lr), where a step
    on the first 4 alone (the control) is off by more than half of lr."""
    runs = {"whole": [sys.executable, STEP_SCRIPT, tmp_path / "whole.safetensors"],
            "accumulated": [sys.executable, STEP_SCRIPT, tmp_path / "accumulated.safetensors", "--accumulation", "2"],
            "half": [sys.executable, STEP_SCRIPT, tmp_path / "half.safetensors", "--share", "0"]}
    students = _student_after_steps(tmp_path, runs)
    assert _worst_difference(students["whole"], students["accumulated"]) <= 0.01 * STEP_LR
    assert _worst_difference(students["whole"], students["half"]) > 0.5 * STEP_LR


def test_fsdp2_run_resumes_exactly_after_sigkill_and_exports_the_ddp_backbone(recipe, tmp_path):
    """The whole loop under `accelerate launch` with 2 processes and `--sharding fsdp2`: killed with SIGKILL after a
    checkpoint (every rank's shards, RNG states and stream positions) and resumed, it reproduces the uninterrupted
    run's losses; its exported backbone (gathered from the shards) equals, bit for bit, the teacher of its last
    checkpoint, which the ranks wrote shard by shard. After 3 iterations from the same seed, an FSDP2 and a DDP run
    export the same student and backbone (measured: identical; over 30 iterations Adam turns last-bit differences of
    near-zero gradients into steps of about lr, and the runs part by a fifth of how far they moved)."""
    from accelerate.utils import set_seed

    from braindino.train.pretraining.checkpoints import checkpoint_weights
    from braindino.train.pretraining.recipe import accelerate_config_path
    from braindino.train.pretraining.self_distillation import build_student

    def launch(output_dir, *arguments):
        return list(map(str, [*arguments, "-m", "braindino.train.pretraining", "--config", recipe, "--output-dir", output_dir]))

    # the reference asks for FSDP2 with --sharding; the killed and resumed runs with the shipped FSDP2 launcher file
    by_file = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config_path("1node-fsdp2"),
               "--num_processes", "2", "--main_process_port", "0"]
    for name, command in (("fsdp2", launch(tmp_path / "fsdp2", *_launch()) + ["--sharding", "fsdp2"]),
                          ("fsdp2-3", launch(tmp_path / "fsdp2-3", *_launch()) + ["--sharding", "fsdp2", "--iterations", "3"]),
                          ("ddp-3", launch(tmp_path / "ddp-3", *_launch()) + ["--iterations", "3"])):
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (name, result.stderr[-3000:])
    killed_dir = tmp_path / "killed"
    killed_at = _kill_after_a_checkpoint(launch(killed_dir, *by_file), killed_dir)
    resumed = subprocess.run(launch(killed_dir, *by_file), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert json.loads((killed_dir / "config.json").read_text())["sharding"] == "fsdp2"
    expected, got = _losses(tmp_path / "fsdp2"), _losses(killed_dir)
    assert sorted(got) == list(range(1, 31))
    for iteration in range(killed_at + 1, 31):
        for name in ("loss", "dino", "ibot", "koleo"):
            assert got[iteration][name] == pytest.approx(expected[iteration][name], rel=1e-5, abs=1e-6), (iteration, name)

    exported = AutoModel.from_pretrained(tmp_path / "fsdp2" / "final" / "backbone").state_dict()
    last = checkpoint_weights(tmp_path / "fsdp2" / "checkpoints" / "iter-0000030")
    assert all(torch.equal(tensor, last[f"teacher.braindino.{name}"]) for name, tensor in exported.items())
    set_seed(0)
    initial = build_student(PretrainConfig.load(str(recipe))).state_dict()
    sharded, replicated = (BrainDinoForPreTraining.from_pretrained(tmp_path / name / "final" / "student").state_dict()
                           for name in ("fsdp2-3", "ddp-3"))
    moved = _worst_difference(replicated, initial)
    assert moved > 1e-6 and _worst_difference(sharded, replicated) <= 0.01 * moved
    backbones = [AutoModel.from_pretrained(tmp_path / name / "final" / "backbone").state_dict() for name in ("fsdp2-3", "ddp-3")]
    assert _worst_difference(*backbones) <= 1e-7


def test_diagnostics_run_in_float32_under_an_autocast_that_leaves_linear_algebra_in_bf16():
    """CUDA autocast runs the prototypes' Gram matrix in bf16 and, unlike CPU autocast, does not cast `eigvalsh`'s
    input back to float32, which has no bf16 kernel: every bf16 recipe crashed at its first step on a GPU. Here CPU
    autocast with CUDA's rule for linear algebra (no rescue) reproduces it: the diagnostics must run in float32."""
    from torch.overrides import TorchFunctionMode

    class CudaRuleForLinearAlgebra(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.linalg.eigvalsh, torch.linalg.eigh, torch.linalg.svdvals, torch.linalg.svd):
                with torch.autocast("cpu", enabled=False):
                    return func(*args, **(kwargs or {}))
            return func(*args, **(kwargs or {}))

    _, model, _, batch, _, _ = _step_setup()
    with torch.autocast("cpu", dtype=torch.bfloat16), CudaRuleForLinearAlgebra():
        losses = model(batch, teacher_temperature=0.04)
        values = {**model.last_diagnostics, **model.parameter_diagnostics()}
    assert losses["loss"].dtype == torch.float32
    assert all(value.dtype == torch.float32 for value in values.values())
    assert float(values["prototype_condition_number"]) >= 1.0


def test_three_non_finite_losses_in_a_row_stop_the_run(tmp_path):
    """DINOv3's guard: a NaN loss twice is logged (as null), the third in a row stops the run in one message."""
    from tqdm.auto import tqdm

    from braindino.train.pretraining.loop import NonFiniteLossError, RunLog

    accelerator, _, _, batch, schedules, recipe = _step_setup()
    recipe.output_dir, recipe.tracker = str(tmp_path), None
    log = RunLog(accelerator, recipe, schedules, tqdm(disable=True))
    nan, finite = torch.tensor(float("nan")), torch.tensor(1.0)
    for iteration, loss in enumerate((nan, nan, finite, nan, nan)):
        log.record(iteration, {"loss": loss}, batch)
    assert [record["loss"] for record in log.flush({})] == [None, None, 1.0, None, None]
    log.record(5, {"loss": nan}, batch)
    with pytest.raises(NonFiniteLossError, match="NaN or infinite at iterations 4, 5, 6; training stopped"):
        log.flush({})


@pytest.mark.parametrize("name", ["1gpu", "1node-ddp", "1node-fsdp2", "2nodes-fsdp2"])
def test_every_shipped_launcher_config_is_read_by_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    from braindino.train.pretraining.recipe import ACCELERATE_CONFIGS_DIR, SHIPPED_LAUNCHER_CONFIGS, accelerate_config_path

    assert sorted(path.stem for path in ACCELERATE_CONFIGS_DIR.glob("*.yaml")) == sorted(SHIPPED_LAUNCHER_CONFIGS)

    config = load_config_from_file(str(accelerate_config_path(name)))
    assert config.num_processes == {"1gpu": 1, "1node-ddp": 8, "1node-fsdp2": 8, "2nodes-fsdp2": 16}[name]
    if "fsdp2" in name:
        assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2


def _step_setup(**recipe_overrides):
    from accelerate import Accelerator

    from braindino.train.data.multicrop import MultiCropCollator, MultiCropConfig
    from braindino.train.pretraining.loop import build_optimizer
    from braindino.train.pretraining.recipe import PretrainConfig
    from braindino.train.pretraining.schedules import build_schedules
    from braindino.train.pretraining.self_distillation import SelfDistillation, build_student

    recipe = PretrainConfig(preset="tiny", model_overrides={**MICRO_MODEL, "layerscale_value": 1.0}, iterations=6,
                            iterations_per_epoch=1, warmup_epochs=0, **recipe_overrides)
    torch.manual_seed(0)
    model = SelfDistillation(build_student(recipe), recipe).train()
    crops = MultiCropConfig(global_crop_size=32, local_crop_size=16, local_crops_number=2)
    batch = {"global_crops": torch.randn(8, 3, 32, 32), "local_crops": torch.randn(8, 3, 16, 16),
             "masks": MultiCropCollator(crops).masks(8)}
    return Accelerator(cpu=True), model, build_optimizer(model.student, recipe), batch, build_schedules(recipe, 4), recipe


def test_prototypes_stay_frozen_through_their_lr_schedule_then_train():
    from braindino.train.pretraining.loop import train_step

    accelerator, model, optimizer, batch, schedules, recipe = _step_setup(freeze_prototypes_epochs=2)
    assert (schedules.prototype_lr[:2] == 0).all() and (schedules.prototype_lr[2:] > 0).all()
    prototypes = lambda: model.student.dino_head.prototypes.detach().clone()  # noqa: E731
    first_block = lambda: model.student.braindino.layers[0].attention.qkv.weight.detach().clone()  # noqa: E731
    for iteration in range(3):
        before, block_before = prototypes(), first_block()
        train_step(accelerator, model, optimizer, batch, schedules, iteration, recipe.clip_grad)
        assert not torch.equal(first_block(), block_before)  # the rest trains from the first step
        assert torch.equal(prototypes(), before) == (iteration < 2), iteration


def test_teacher_update_is_the_ema_of_the_student():
    _, model, _, _, _, _ = _step_setup()
    with torch.no_grad():
        for parameter in model.student.parameters():
            parameter.add_(torch.randn_like(parameter))
    teacher = [parameter.clone() for parameter in model.teacher.parameters()]
    model.update_teacher(0.9)
    for old, new, student in zip(teacher, model.teacher.parameters(), model.student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * student)


@pytest.mark.parametrize("name", sorted(path.stem for path in RECIPES_DIR.glob("*.json")))
def test_every_bundled_recipe_loads_with_crops_on_its_patch_grid(name):
    """A bundled recipe with an unknown key or crops off the patch grid fails here, not hours into a run; stage-2
    recipes give the Gram teacher larger crops than the student's, as DINOv3 does."""
    recipe = PretrainConfig.load(name)
    patch_size = BrainDinoConfig.from_preset(recipe.preset, **recipe.model_overrides).patch_size
    sizes = [recipe.global_crop_size, recipe.local_crop_size, recipe.gram_teacher_crop_size or patch_size]
    assert all(size % patch_size == 0 for size in sizes)
    if recipe.gram_loss_weight:
        assert recipe.gram_teacher_crop_size > recipe.global_crop_size


def test_a_bundled_recipe_name_is_read_as_the_recipe_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    """`--config tiny` run where an earlier run's output folder `tiny/` sits in the working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    assert PretrainConfig.load("tiny") == PretrainConfig(**json.loads((RECIPES_DIR / "tiny.json").read_text()))
    with pytest.raises(FileNotFoundError, match="no-such-recipe: no such config file"):
        PretrainConfig.load("no-such-recipe")


def test_gram_anchoring_in_the_loop_refreshes_its_teacher_and_adds_its_loss(recipe, tmp_path):
    """Stage 2 inside the real loop, with DINOv3's higher-resolution Gram crops (64 px for 32 px global crops, the
    teacher's 4 x 4 patch grid resized to the student's 2 x 2): the Gram term is logged and weighted into the loss,
    and the Gram teacher is the EMA teacher copied every `gram_teacher_refresh_iterations` (here 2) at most
    `gram_teacher_max_refreshes` times (here 2, DINOv3's `max_updates` is 3): equal to it right after each refresh
    (iterations 2 and 4), behind it once the refreshes are spent (iteration 6)."""
    from braindino.train.pretraining.checkpoints import checkpoint_weights

    stage2 = tmp_path / "stage2.json"
    stage2.write_text(json.dumps({**json.loads(recipe.read_text()), "iterations": 6, "gram_loss_weight": 1.0,
                                  "gram_teacher_crop_size": 64, "gram_teacher_refresh_iterations": 2, "gram_teacher_max_refreshes": 2,
                                  "checkpoint_every": 2, "keep_checkpoints": 3}))
    result = subprocess.run(_command(stage2, tmp_path / "run"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = _losses(tmp_path / "run")
    for record in records.values():
        weighted = record["dino"] + record["ibot"] + 0.1 * 2 * record["koleo"] + record["gram"]  # KoLeo scale: 2 global crops
        assert record["loss"] == pytest.approx(weighted, rel=1e-5)
    assert records[6]["gram"] > 0
    states = {iteration: checkpoint_weights(tmp_path / "run" / "checkpoints" / f"iter-{iteration:07d}")
              for iteration in (2, 4, 6)}
    teacher_keys = [key for key in states[6] if key.startswith("teacher.")]
    assert teacher_keys
    for iteration in (2, 4):
        assert all(torch.equal(states[iteration][key], states[iteration]["gram_" + key]) for key in teacher_keys)
    assert not all(torch.equal(states[6][key], states[6]["gram_" + key]) for key in teacher_keys)
    assert all(torch.equal(states[4]["gram_" + key], states[6]["gram_" + key]) for key in teacher_keys)


def test_a_second_run_in_one_process_takes_its_own_precision(recipe, tmp_path):
    """A notebook or a sweep calls `pretrain()` more than once in one process: an Accelerator made earlier with
    another precision (fp32 here) does not make the next run fail, and the run trains in the precision it asks for."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from braindino.train.pretraining.loop import pretrain
    from braindino.train.pretraining.recipe import PretrainConfig

    assert Accelerator(cpu=True).mixed_precision == "no"
    config = PretrainConfig.load(str(recipe), output_dir=str(tmp_path / "run"), iterations=2, mixed_precision="bf16")
    try:
        assert pretrain(config, resume=False)["iterations"] == 2
        assert AcceleratorState().mixed_precision == "bf16"
    finally:  # later tests in this process make their own fp32 Accelerator, which would otherwise inherit bf16
        AcceleratorState._reset_state()
    assert (tmp_path / "run" / "final" / "backbone" / "model.safetensors").exists()


def test_time_limit_stops_every_rank_with_a_checkpoint_and_an_export(recipe, tmp_path):
    """Also: the run's messages (the uniform-target warning, with the prototypes training from the first step at
    DINOv3's init, and the time-limit line) start a line of the output instead of running on from the progress bar.
    The clock is read when the run logs (every `log_every` iterations, here 3: no step waits for the device)."""
    config = {**json.loads(recipe.read_text()), "warmup_epochs": 0, "freeze_prototypes_epochs": 0, "log_every": 3}
    (tmp_path / "recipe.json").write_text(json.dumps(config))
    result = subprocess.run(_command(tmp_path / "recipe.json", tmp_path / "run", "--time-limit-minutes", "0"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "time limit of 0.0 min reached after 3 iterations" in result.stdout + result.stderr
    assert sorted(_losses(tmp_path / "run")) == [1, 2, 3]
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["iteration"] == 3
    card = (tmp_path / "run" / "final" / "backbone" / "README.md").read_text()
    assert "3 iterations (stopped by its time limit of 0 min; the recipe's schedules run to 30)" in card
    lines = re.split(r"[\r\n]", result.stdout + result.stderr)
    assert any(line.startswith("iteration 1: the teacher's DINO targets are uniform") for line in lines), result.stderr
    assert "time limit of 0.0 min reached after 3 iterations" in lines, result.stderr


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
    # float32 rounding: outputs reach about 3.5, where one ulp is 2.4e-7; measured 5e-7 to 1e-6 over three seeds
    assert difference <= 2e-6
    assert model.config.num_prototypes == BrainDinoConfig.from_preset("tiny").num_prototypes


def test_knn_monitor_resolves_the_untrained_near_identity_backbone(synthetic_corpus):
    # At step 0 a run from DINOv3's LayerScale 1e-5 has subject embeddings 1 - cos ~ 1e-8 apart: float32 distances
    # there are rounding noise, so the monitor scores them in float64 (the recomputation below, in both precisions).
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    from braindino.train.pretraining.knn_monitor import KnnMonitor

    monitor = KnnMonitor(synthetic_corpus / "sequences.csv", "image", "contrast", size=64, num_slices=8)
    torch.manual_seed(0)
    backbone = BrainDinoModel(BrainDinoConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        embeddings = np.stack([backbone.encode_slices(volume).cls_tokens.mean(dim=0).double().numpy()
                               for volume in monitor.pixel_values])
    folds = list(GroupKFold(n_splits=5).split(embeddings, groups=monitor.groups))
    scores = {dtype: balanced_accuracy_score(monitor.targets, cross_val_predict(
        KNeighborsClassifier(n_neighbors=5, metric="cosine"), embeddings.astype(dtype), monitor.targets, cv=folds))
        for dtype in (np.float32, np.float64)}
    assert scores[np.float64] > scores[np.float32] + 0.2  # this backbone is the case float32 cannot resolve
    assert monitor(backbone) == pytest.approx(scores[np.float64])


def test_knn_monitor_and_backbone_card_of_a_pretraining_run(recipe, tmp_path, synthetic_corpus):
    sequences = synthetic_corpus / "sequences.csv"  # 10 subjects: with the recipe corpus's 2, k-NN is always 0.25
    result = subprocess.run(_command(recipe, tmp_path / "run", "--iterations", "10", "--knn-labels", str(sequences),
                                     "--knn-every", "5"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = _losses(tmp_path / "run")
    assert [i for i, record in records.items() if "knn_balanced_accuracy" in record] == [5, 10]
    # Each value is the EMA teacher's of that iteration (from its checkpoint): its subject embeddings (mean CLS over
    # 16 slices), cosine 5-NN cross-validated over 5 folds by subject, recomputed here.
    from braindino.train.pretraining.checkpoints import checkpoint_weights
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    released = tmp_path / "run" / "final" / "backbone"
    processor = BrainDinoImageProcessor.from_pretrained(released, num_slices=16)
    rows = list(csv.DictReader(open(sequences)))
    pixel_values = [processor.preprocess_volume(sequences.parent / row["image"])[0] for row in rows]
    targets, groups = np.array([row["contrast"] for row in rows]), np.array([row["subject"] for row in rows])
    folds = list(GroupKFold(n_splits=5).split(pixel_values, groups=groups))
    for iteration in (5, 10):
        state = checkpoint_weights(tmp_path / "run" / "checkpoints" / f"iter-{iteration:07d}")
        teacher = BrainDinoModel.from_pretrained(released).eval()
        teacher.load_state_dict({name.removeprefix("teacher.braindino."): value for name, value in state.items()
                                 if name.startswith("teacher.braindino.")})
        with torch.no_grad():
            embeddings = np.stack([teacher.encode_slices(volume).cls_tokens.mean(dim=0).double().numpy()
                                   for volume in pixel_values])
        predicted = cross_val_predict(KNeighborsClassifier(n_neighbors=5, metric="cosine"), embeddings, targets, cv=folds)
        assert records[iteration]["knn_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(targets, predicted))
    card = (tmp_path / "run" / "final" / "backbone" / "README.md").read_text()  # generated from this run's facts
    assert "10 iterations in" in card and "SYNTHETIC" in card and "not for clinical decisions" in card  # no time limit hit
    assert "license: mit" in card and "pipeline_tag: image-feature-extraction" in card
    assert_hub_valid_card(tmp_path / "run" / "final" / "backbone" / "README.md")
    for folder in ("student", "teacher", "backbone"):  # each released folder carries the size it trained at
        processor = json.loads((tmp_path / "run" / "final" / folder / "preprocessor_config.json").read_text())
        assert processor["size"] == json.loads(recipe.read_text())["global_crop_size"], folder
    assert "no image processor saved" not in result.stderr


def test_diagnostics_show_the_uniform_state_and_its_absence():
    """Identical images (the state CPU-scale runs start in: every CLS token the same) give uniform Sinkhorn-Knopp
    targets: entropy log K, one argmax prototype, no CLS spread. Distinct images do not."""
    _, model, _, batch, _, _ = _step_setup()
    same = {**batch, "global_crops": batch["global_crops"][:1].expand_as(batch["global_crops"]).contiguous(),
            "local_crops": batch["local_crops"][:1].expand_as(batch["local_crops"]).contiguous(),
            "masks": batch["masks"][:1].expand_as(batch["masks"]).contiguous()}
    model.eval()  # no RoPE augmentation: identical inputs give identical tokens
    model(same, teacher_temperature=0.04)
    uniform = {name: float(value) for name, value in model.last_diagnostics.items()}
    assert uniform["teacher_cls_entropy"] == pytest.approx(uniform["log_num_prototypes"], abs=1e-4)
    assert uniform["prototypes_used"] == 1
    assert uniform["teacher_cls_spread"] < 1e-5 and uniform["student_cls_spread"] < 1e-5
    model(batch, teacher_temperature=0.04)
    varied = {name: float(value) for name, value in model.last_diagnostics.items()}
    assert varied["teacher_cls_entropy"] < uniform["log_num_prototypes"] - 0.1
    assert varied["prototypes_used"] > 1
    assert varied["teacher_cls_spread"] > 1e-2 and varied["student_cls_spread"] > 1e-2
    parameters = {name: float(value) for name, value in model.parameter_diagnostics().items()}
    assert parameters["layerscale_mean_abs"] == pytest.approx(1.0)  # the micro model's LayerScale init, untrained
    assert parameters["prototype_condition_number"] >= 1.0
    assert varied["student_score_std"] > 1e-2  # random prototypes: the scores differ across them
    with torch.no_grad():  # a head that matches uniform targets: every prototype scores an image the same
        model.student.dino_head.prototypes.copy_(model.student.dino_head.prototypes[:1].expand_as(model.student.dino_head.prototypes))
    model(batch, teacher_temperature=0.04)
    assert float(model.last_diagnostics["student_score_std"]) < 1e-6


def test_under_bf16_autocast_the_networks_run_in_bf16_and_the_losses_in_float32():
    """`--mixed-precision bf16` (and `auto` on bf16 CPUs): the same batch gives the fp32 losses to bf16's error on the
    network outputs, not the 0.03-nat steps of a loss computed in bf16 (its einsum would autocast to bf16)."""
    _, model, _, batch, _, _ = _step_setup()
    model.eval()  # no RoPE augmentation, no drop: both forwards see the same network
    with torch.no_grad():  # values only
        exact = model(batch, teacher_temperature=0.04)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            mixed = model(batch, teacher_temperature=0.04)
            logits = model.student(batch["global_crops"]).cls_logits
    assert logits.dtype == torch.bfloat16  # the networks did run in bf16
    for name in ("dino", "ibot", "koleo", "loss"):
        assert mixed[name].dtype == torch.float32, name
        assert float(mixed[name]) == pytest.approx(float(exact[name]), rel=2e-3, abs=2e-3), name
    assert float(mixed["dino"]) != float(exact["dino"])  # really computed from bf16 outputs


def test_compiled_backbones_give_the_eager_losses_and_gradients():
    """The recipe's `compile`: torch.compile'd backbones (inductor, here on the CPU) compute the same losses and student
    gradients as eager ones, and the state dict keeps its names, so checkpoints and exports do not change."""
    import copy

    _, eager, _, batch, _, _ = _step_setup()
    compiled = copy.deepcopy(eager)
    compiled.compile_backbones()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    losses = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        model.eval()  # no RoPE augmentation: both see the same network (compiled code draws its own random numbers)
        losses[name] = model(batch, teacher_temperature=0.04)
        losses[name]["loss"].backward()
    for term in ("dino", "ibot", "koleo", "loss"):
        assert float(losses["compiled"][term].detach()) == pytest.approx(float(losses["eager"][term].detach()), rel=1e-3), term
    for (name, reference), parameter in zip(eager.student.named_parameters(), compiled.student.parameters()):
        if reference.grad is not None and reference.grad.norm() > 0:
            assert float((parameter.grad - reference.grad).norm() / reference.grad.norm()) < 1e-2, name


def test_softmax_centring_keeps_its_own_centre_for_the_patches_as_dinov3():
    """DINOv3's iBOT loss centres its teacher patch scores with its own EMA centre (momentum 0.9), apart from the CLS
    centre: the second call's patch targets are softmax((scores - 0.1 x first call's mean score) / T)."""
    _, model, _, batch, _, _ = _step_setup(centering="softmax")
    model.eval()
    scores = model.teacher(batch["global_crops"], patch_positions=batch["masks"])
    model.teacher_targets(batch, 0.04)
    second = model.teacher_targets(batch, 0.04)
    for field, targets in (("masked_patch_logits", second["patches"]), ("cls_logits", second["cls"])):
        logits = getattr(scores, field).float()
        expected = torch.softmax((logits - 0.1 * logits.mean(dim=0, keepdim=True)) / 0.04, dim=-1)
        torch.testing.assert_close(targets, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(model.centering.center, model.patch_centering.center)  # two centres


def test_the_log_warns_once_when_the_dino_targets_are_uniform_after_the_prototypes_unfreeze(caplog, tmp_path):
    """A run whose teacher gives every image the same CLS target says so while it runs, once, naming both spreads;
    not while the prototypes are frozen, and not for distinct images."""
    from tqdm.auto import tqdm

    from braindino.train.pretraining.loop import RunLog

    accelerator, model, _, batch, schedules, recipe = _step_setup(freeze_prototypes_epochs=2)
    recipe.output_dir, recipe.tracker = str(tmp_path), None
    same = {**batch, **{key: batch[key][:1].expand_as(batch[key]).contiguous() for key in ("global_crops", "local_crops", "masks")}}
    model.eval()  # no RoPE augmentation: identical inputs give identical tokens
    log = RunLog(accelerator, recipe, schedules, tqdm(disable=True))

    def step(iteration, crops):
        losses = model(crops, teacher_temperature=0.04)
        log.record(iteration, {**losses, **model.last_diagnostics}, crops)
        log.flush({})

    with caplog.at_level(logging.WARNING, logger="braindino.train.pretraining.loop"):
        step(0, same)  # prototypes frozen: no warning yet
        step(2, batch)  # distinct images: informative targets
        assert not caplog.records
        step(3, same)
        step(4, same)
    (warning,) = caplog.records
    assert warning.getMessage().startswith("iteration 4: the teacher's DINO targets are uniform")
    assert "CLS spread across the batch: teacher " in warning.getMessage() and ", student " in warning.getMessage()
