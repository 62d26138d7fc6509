"""Stage 2, self-supervised pretraining (DINOv3-style): recipes (`recipe`, `configs/*.json`), the module that owns
student, EMA teacher, Gram teacher, centring and losses (`self_distillation`), one loss per module (`losses/`),
schedules as arrays (`schedules`), the optimiser policy (`param_groups`), checkpoints with exact resume
(`checkpoints`), the k-NN monitor (`knn_monitor`) and the Accelerate loop (`loop`).

`accelerate launch -m braindino.train.pretraining --config tiny --corpus DIR` runs the loop on N processes."""
