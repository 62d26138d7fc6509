"""BrainDINO training side: corpus building, data, losses, pretraining, heads, evaluation, CLI."""
