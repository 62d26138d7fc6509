"""Sharing on the Hugging Face Hub: a saved folder (weights, config, processor, code, card) goes up as it is."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi


def push_folder(folder: str | Path, repo_id: str, private: bool = False, commit_message: str | None = None) -> str:
    """Create `repo_id` if needed and upload `folder` in one commit through `huggingface_hub`; return the commit
    URL. The folder must be a complete `save_pretrained` folder with its model card (`README.md`)."""
    folder = Path(folder)
    missing = [name for name in ("config.json", "model.safetensors", "README.md") if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"{folder}: not a complete BrainDINO export (missing {', '.join(missing)})")
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=folder, repo_id=repo_id,
                               commit_message=commit_message or f"Upload {folder.name} with braindino")
    return commit.commit_url
