"""Stage 1, data: the labelled SYNTHETIC corpus (`synthetic`), the Parquet
slice corpus (`slice_corpus`), its per-rank stream (`stream`), multi-crop views with iBOT masks (`multicrop`) and
their preview picture (`preview`)."""
