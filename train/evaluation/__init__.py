"""Stage 5, evaluation: metrics from well-kept libraries (`metrics`), statistics (`statistics`), the `train-head`
runs over folds, label fractions and seeds (`head_runs`), the several-backbone protocol of `braindino evaluate`
(`protocol`), its tables and plots (`reports`) and the quickstart's report pictures (`figures`)."""
