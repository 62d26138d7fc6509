"""Stage 3, task heads on the frozen backbone: the feature cache (`feature_cache`), labelled samples and
subject-grouped splits (`samples`), fitting with model selection (`fitting`), volume heads (`volume`) and the
segmentation decoder (`segmentation`)."""
