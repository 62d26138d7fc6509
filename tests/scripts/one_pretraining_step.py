"""Steps of the pretraining loop's own `train_step` on a fixed global batch of 8 images; with N processes each rank
takes its 8 / N. Writes the student's parameters after the steps (gathered from the shards under FSDP2, rank 0) to
the path given.

    python one_pretraining_step.py OUT.safetensors [--share 0]     # 1 process (--share k: only rank k's half of the batch)
    accelerate launch --multi_gpu --num_processes 2 one_pretraining_step.py OUT.safetensors [--sharding fsdp2] [--steps 3]
"""

import argparse

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from braindino.train.pretraining.loop import distribute, train_step
from braindino.train.pretraining.recipe import PretrainConfig
from braindino.train.pretraining.schedules import build_schedules
from braindino.train.pretraining.self_distillation import SelfDistillation, build_student
from braindino.train.pretraining.sharding import full_state_dict, is_sharded

GLOBAL_BATCH = 8
# KoLeo is per rank by design (nearest neighbours within a rank's batch, as in DINOv3), and RoPE augmentation draws
# per-rank randomness: both are off so that 1 and 2 processes optimise the same objective.
MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
         "head_hidden_size": 64, "head_bottleneck_size": 32, "num_prototypes": 64, "layerscale_value": 1.0,
         "rope_rescale_coords": None}


def global_batch() -> dict:
    """Crop-major views of 8 images; the iBOT masks cover images 0, 2, 4, 6 of both global views, so every rank of
    2 holds the same number of masked crops."""
    generator = torch.Generator().manual_seed(1)
    masks = torch.rand(2, GLOBAL_BATCH, 4, generator=generator) < 0.5
    masks[:, 1::2] = False
    masks[:, 0::2, 0] = True
    return {"global_crops": torch.randn(2, GLOBAL_BATCH, 3, 32, 32, generator=generator),
            "local_crops": torch.randn(2, GLOBAL_BATCH, 3, 16, 16, generator=generator), "masks": masks}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--share", type=int, help="one process taking only this rank's half of the batch")
    parser.add_argument("--sharding", default="ddp")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per step")
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True)
    share = accelerator.process_index if args.share is None else args.share
    parts = accelerator.num_processes if args.share is None else 2
    recipe = PretrainConfig(preset="tiny", model_overrides=MODEL, iterations=4, iterations_per_epoch=1, warmup_epochs=0,
                            freeze_prototypes_epochs=0, koleo_loss_weight=0.0, base_lr=0.05, sharding=args.sharding)
    torch.manual_seed(0)
    model, optimizer = distribute(accelerator, SelfDistillation(build_student(recipe), recipe), recipe)
    size = GLOBAL_BATCH // parts
    mine = slice(share * size, (share + 1) * size)
    batch = {key: value[:, mine].flatten(0, 1) for key, value in global_batch().items()}
    for step in range(args.steps):
        train_step(accelerator, model, optimizer, batch, build_schedules(recipe, GLOBAL_BATCH), step, recipe.clip_grad,
                   args.accumulation)
    student = full_state_dict(accelerator.unwrap_model(model).student)
    if accelerator.is_main_process:
        print(f"sharded: {is_sharded(model)}")
        save_file({name: tensor.contiguous() for name, tensor in student.items()}, args.out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
