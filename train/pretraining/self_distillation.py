"""The object that owns the pretraining state: student, EMA teacher, Gram teacher, centring and the losses.

As in DINOv3's meta-architecture, the loop only calls small methods of one module: the losses of a batch
(`forward`, so DDP sees one forward per backward), the teacher update, the Gram-teacher refresh. Its state dict
is the whole training state apart from the optimiser, so a checkpoint is one `accelerator.save_state`.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from braindino import (
    BrainDinoConfig,
    BrainDinoForPreTraining,
    braindino_from_dinov2,
    braindino_from_dinov3,
)
from braindino.train.pretraining.losses import (
    DinoClsTokenLoss,
    GramLoss,
    IBotPatchLoss,
    KoLeoLoss,
    SoftmaxCentering,
    resize_patch_grid,
    sinkhorn_knopp,
)
from braindino.train.pretraining.recipe import PretrainConfig
from braindino.train.pretraining.sharding import reshard

HEAD_SIZES = ("head_hidden_size", "head_bottleneck_size", "head_num_layers", "num_prototypes")


def build_student(config: PretrainConfig) -> BrainDinoForPreTraining:
    """From a BrainDINO pretraining folder, from scratch (the preset), or with natural-image backbone
    weights (DINOv3/DINOv2) under fresh heads of the preset's sizes."""
    if config.init_from and config.init_format == "braindino":
        return BrainDinoForPreTraining.from_pretrained(config.init_from)
    model_config = BrainDinoConfig.from_preset(config.preset, **config.model_overrides)
    if not config.init_from:
        return BrainDinoForPreTraining(model_config)

    convert = {"dinov3": braindino_from_dinov3, "dinov2": braindino_from_dinov2}[config.init_format]
    backbone = convert(config.init_from, **config.model_overrides)
    heads = {key: getattr(model_config, key) for key in HEAD_SIZES}
    model = BrainDinoForPreTraining(BrainDinoConfig(**{**backbone.config.to_dict(), **heads}))
    model.braindino.load_state_dict(backbone.state_dict())
    return model


class SelfDistillation(nn.Module):
    """Student and teachers of one recipe, with its losses and their weights.

    `forward(batch, teacher_temperature)` returns each term's value and `loss`, composed as DINOv3 composes it:
        loss = w_dino * dino + w_ibot * ibot + w_koleo * G * koleo (+ w_gram * gram in stage 2)
    - dino: the mean over every (student crop u, teacher global crop v != u) pair, which is DINOv3's
      global_scale * global term + local_scale * local term with global_scale = G (G - 1) / (G (G - 1) + G L) and
      local_scale = G L / (G (G - 1) + G L) (G = 2 global crops, L local crops);
    - ibot: summed over masked patches (each 1 / masked patches of its image), divided by all G * B global crops;
    - koleo: the mean over the G global crops of each crop's KoLeo over the batch, scaled by G (the number of
      global crops, DINOv3's `koleo_scale`), i.e. the sum over the global crops;
    - gram: weighted by w_gram alone.
    """

    def __init__(self, student: BrainDinoForPreTraining, config: PretrainConfig):
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student).eval().requires_grad_(False)
        self.gram_teacher = copy.deepcopy(self.teacher) if config.gram_loss_weight > 0 else None
        num_prototypes = student.config.num_prototypes
        # softmax mode: CLS and patch targets each keep their own centre, as DINOv3's DINO and iBOT losses do
        self.centering = SoftmaxCentering(num_prototypes) if config.centering == "softmax" else None
        self.patch_centering = SoftmaxCentering(num_prototypes) if config.centering == "softmax" else None
        self.dino_loss = DinoClsTokenLoss(config.student_temperature)
        self.ibot_loss = IBotPatchLoss(config.student_temperature)
        self.koleo_loss = KoLeoLoss()
        self.gram_loss = GramLoss()
        self.loss_weights = {"dino": config.dino_loss_weight, "ibot": config.ibot_loss_weight,
                             "koleo": config.koleo_loss_weight, "gram": config.gram_loss_weight}
        self.num_global_crops = 2
        self.last_diagnostics: dict[str, torch.Tensor] = {}

    def compile_backbones(self) -> None:
        """`torch.compile` each backbone in place (parameter names and checkpoints unchanged); the heads and losses
        stay eager, as they are a few matmuls."""
        for network in (self.student, self.teacher, self.gram_teacher):
            if network is not None:
                network.braindino.compile()

    def train(self, mode: bool = True) -> "SelfDistillation":
        super().train(mode)
        self.teacher.eval()  # teachers never train: no drop-path, no RoPE augmentation
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    @torch.no_grad()
    def teacher_targets(self, batch: dict, temperature: float) -> dict[str, torch.Tensor | None]:
        """Centred teacher targets for the CLS tokens `(2B, K)` and the masked patches `(M, K)` of the global crops,
        and the Gram teacher's patch tokens where there is one: of the batch's `gram_crops` where it has them (the
        same views at a higher resolution), resized to the student's patch grid; and the teacher's CLS tokens (the
        diagnostics' teacher spread)."""
        global_crops, masks = batch["global_crops"], batch["masks"]
        output = self.teacher(global_crops, patch_positions=masks)
        with _full_precision(global_crops):
            if self.centering is None:
                cls_targets = sinkhorn_knopp(output.cls_logits, temperature)
                patch_targets = sinkhorn_knopp(output.masked_patch_logits, temperature)
            else:
                cls_targets = self.centering(output.cls_logits, temperature)
                patch_targets = self.patch_centering(output.masked_patch_logits, temperature)
        gram = None
        if self.gram_teacher is not None:
            gram = self.gram_teacher.braindino(batch.get("gram_crops", global_crops)).patch_tokens
            with _full_precision(global_crops):
                gram = resize_patch_grid(gram, math.isqrt(masks.shape[1]))
        return {"cls": cls_targets, "patches": patch_targets, "gram": gram, "cls_tokens": output.cls_tokens}

    def forward(self, batch: dict, teacher_temperature: float, targets: dict | None = None) -> dict[str, torch.Tensor]:
        """Each term's value and the weighted `loss`. `targets`: this batch's teacher targets where the caller computed
        them over a larger batch (gradient accumulation: `split_micro_batches`)."""
        if targets is None:
            targets = self.teacher_targets(batch, teacher_temperature)
        global_crops, local_crops, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
        global_output = self.student(global_crops, bool_masked_pos=masks, patch_positions=masks)
        student_cls = global_output.cls_logits
        if local_crops.shape[0]:
            student_cls = torch.cat([student_cls, self.student(local_crops).cls_logits])  # [(2 + N) * B, K], crop-major
        per_crop_cls = global_output.cls_tokens.chunk(self.num_global_crops)  # 2 x [B, D]
        with _full_precision(global_crops):
            values = {
                "dino": self.dino_loss(student_cls, targets["cls"], self.num_global_crops),
                "ibot": self.ibot_loss(global_output.masked_patch_logits, targets["patches"], masks),
                "koleo": torch.stack([self.koleo_loss(view) for view in per_crop_cls]).mean(),
            }
            if targets["gram"] is not None:
                values["gram"] = self.gram_loss(global_output.patch_tokens, targets["gram"])
        scales = {"koleo": self.num_global_crops}  # DINOv3's koleo_scale; every other term has scale 1
        values["loss"] = sum(self.loss_weights[name] * scales.get(name, 1) * value for name, value in values.items())
        self.last_diagnostics = self.diagnostics(targets, global_output)
        return values

    @torch.no_grad()
    def diagnostics(self, targets: dict, student_output) -> dict[str, torch.Tensor]:
        """What shows a collapsed or uniform state while it happens (every step, this rank's batch, on the device with
        no host sync): the teacher targets' mean entropy (CLS and masked patches) against log K, how many prototypes
        are the argmax of some teacher CLS target, the spread of the teacher's and the student's CLS tokens across the
        batch (relative to their norm: Sinkhorn-Knopp turns a teacher spread near 0 into uniform targets, however far
        the student has moved), and the spread of the student's DINO scores across prototypes (near 0: its head has
        turned orthogonal to every prototype, the way it matches uniform targets). In float32 whatever the autocast."""
        def entropy(probabilities: torch.Tensor) -> torch.Tensor:
            if not len(probabilities):
                return probabilities.new_tensor(float("nan"))
            return -(probabilities * probabilities.clamp(min=1e-12).log()).sum(dim=-1).mean()

        def spread(tokens: torch.Tensor) -> torch.Tensor:
            tokens = tokens.detach().float()
            return (tokens - tokens.mean(dim=0)).norm(dim=-1).mean() / tokens.norm(dim=-1).mean().clamp(min=1e-12)

        cls_targets = targets["cls"].float()
        num_prototypes = cls_targets.shape[-1]
        with _full_precision(cls_targets):
            used = cls_targets.new_zeros(num_prototypes).index_fill_(0, cls_targets.argmax(dim=-1), 1.0).sum()
            return {
                "log_num_prototypes": cls_targets.new_tensor(math.log(num_prototypes)),
                "teacher_cls_entropy": entropy(cls_targets),
                "teacher_patch_entropy": entropy(targets["patches"].float()),
                "prototypes_used": used,  # not unique().numel(), which waits for the device
                "teacher_cls_spread": spread(targets["cls_tokens"]),
                "student_cls_spread": spread(student_output.cls_tokens),
                "student_score_std": student_output.cls_logits.detach().float().std(dim=-1).mean(),
            }

    @torch.no_grad()
    def parameter_diagnostics(self) -> dict[str, torch.Tensor]:
        """What the student's parameters say, read when a step is logged (they change slowly, and the eigenvalues
        wait for the device): the mean |LayerScale| gain, and the condition number of the L2-normalised DINO
        prototype matrix. In float32 whatever the autocast: CUDA autocast runs `P.T @ P` in bf16, and `eigvalsh` has
        no bf16 kernel (CPU autocast hides it by casting eigvalsh's input back). Sharded parameters are gathered, so
        every rank calls this."""
        reshard(self)
        prototypes = full_tensor(self.student.dino_head.prototypes).detach()
        with _full_precision(prototypes):
            prototypes = torch.nn.functional.normalize(prototypes.float(), dim=-1)
            eigenvalues = torch.linalg.eigvalsh(prototypes.T @ prototypes)  # [bottleneck], ascending
            gains = [full_tensor(parameter).detach().float().abs().mean() for name, parameter in self.student.named_parameters()
                     if ".layer_scale1." in name or ".layer_scale2." in name]  # ours (gamma) and transformers' (lambda1)
            return {
                "layerscale_mean_abs": torch.stack(gains).mean() if gains else prototypes.new_tensor(float("nan")),
                "prototype_condition_number": (eigenvalues[-1] / eigenvalues[0].clamp(min=1e-12)).sqrt(),
            }

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, one fused pass over all tensors (shard by shard
        under FSDP2)."""
        reshard(self)
        torch._foreach_lerp_(list(self.teacher.parameters()), [p.detach() for p in self.student.parameters()],
                             1 - momentum)

    @torch.no_grad()
    def refresh_gram_teacher(self) -> None:
        """Stage 2: the Gram teacher becomes a copy of the current EMA teacher (shard by shard under FSDP2)."""
        reshard(self)
        self.gram_teacher.load_state_dict(self.teacher.state_dict())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter sharded by FSDP2 (a DTensor: a collective, so every rank calls it); a plain
    tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _full_precision(reference: torch.Tensor):
    """Targets and losses in float32 even under bf16 autocast (which would run their einsums and matmuls in bf16,
    quantising a loss near log K to steps of 0.03): the networks run in bf16, the arithmetic on their outputs not."""
    return torch.autocast(device_type=reference.device.type, enabled=False)
