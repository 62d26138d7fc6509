"""Stage 5, release: model cards generated from real results (`cards`) and upload to the Hub (`hub`)."""
