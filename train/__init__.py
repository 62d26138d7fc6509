"""BrainDINO training side, one sub-package per stage of the data path:

data → pretraining → heads → evaluation → release; `cli` parses the `braindino` command line, `quickstart`
chains every stage on the embedded SYNTHETIC data, `predict` runs the pipelines over files."""
