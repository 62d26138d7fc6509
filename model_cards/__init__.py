"""Model-card templates (Jinja2, for `huggingface_hub.ModelCard.from_template`), filled from real results JSON."""
