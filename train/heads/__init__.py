"""Stage 4, task heads on the frozen backbone's features: labelled samples and subject-grouped splits (`samples`),
fitting with model selection (`fitting`), volume heads (`volume`) and the segmentation decoder (`segmentation`)."""
