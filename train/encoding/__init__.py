"""Stage 3, frozen encoding: backbone loading (`backbones`), the volume loader that reads and preprocesses volumes in
worker processes and packs their slices into batches (`volume_loader`), and the feature cache with multi-process
extraction (`feature_cache`)."""
