"""Saved folders: Auto* registration, safetensors only, and loading with trust_remote_code where the
package cannot be imported (a real fresh Python process)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from braindino import BrainDinoConfig, BrainDinoImageProcessor, BrainDinoModel


@pytest.fixture
def saved_folder(tmp_path, tiny_config, seeded):
    model = BrainDinoModel(tiny_config).eval()
    model.save_pretrained(tmp_path / "model")
    BrainDinoImageProcessor(size=32).save_pretrained(tmp_path / "model")
    return tmp_path / "model", model


def test_auto_classes_round_trip_in_safetensors(saved_folder):
    folder, model = saved_folder
    files = sorted(path.name for path in folder.iterdir())
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    assert isinstance(AutoConfig.from_pretrained(folder), BrainDinoConfig)
    reloaded = AutoModel.from_pretrained(folder)
    assert isinstance(reloaded, BrainDinoModel)
    processor = AutoImageProcessor.from_pretrained(folder)
    assert isinstance(processor, BrainDinoImageProcessor) and processor.size == 32
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(pixel_values).last_hidden_state, model(pixel_values).last_hidden_state)


def test_saved_config_carries_auto_map_and_module_files(saved_folder):
    folder, _ = saved_folder
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "braindino"
    assert config["auto_map"]["AutoModel"] == "modeling_braindino.BrainDinoModel"
    assert config["auto_map"]["AutoConfig"] == "configuration_braindino.BrainDinoConfig"
    assert (folder / "modeling_braindino.py").exists() and (folder / "configuration_braindino.py").exists()


def test_pickle_weights_are_refused(tmp_path, tiny_config):
    folder = tmp_path / "pickled"
    tiny_config.save_pretrained(folder)
    torch.save(BrainDinoModel(tiny_config).state_dict(), folder / "pytorch_model.bin")
    with pytest.raises((OSError, ValueError)):
        BrainDinoModel.from_pretrained(folder)
    with pytest.raises(ValueError, match="safetensors only"):
        BrainDinoModel.from_pretrained(folder, use_safetensors=False)


def test_folder_loads_with_remote_code_where_the_package_is_not_importable(saved_folder, tmp_path):
    folder, model = saved_folder
    pixel_values = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.save(model(pixel_values).pooler_output, tmp_path / "expected.pt")
    torch.save(pixel_values, tmp_path / "input.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["braindino"] = None  # any import of the installed package now fails
        try:
            import braindino
        except ImportError:
            pass
        else:
            raise SystemExit("braindino is importable")
        import torch
        from transformers import AutoImageProcessor, AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        processor = AutoImageProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(processor).__name__ == "BrainDinoImageProcessor" and processor.size == 32
        with torch.no_grad():
            output = model(torch.load({str(tmp_path / "input.pt")!r})).pooler_output
        torch.testing.assert_close(output, torch.load({str(tmp_path / "expected.pt")!r}))
        print("remote code ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote code ok" in result.stdout


def test_generated_cards_pass_the_hubs_metadata_readers(tmp_path, synthetic_corpus):
    """A classification head's card (a real train-head run), and backbone cards for weights from scratch, from
    DINOv3 (Meta's licence: `other` with its name and link) and from DINOv2, through huggingface_hub's parsers."""
    import dataclasses

    from conftest import assert_hub_valid_card

    from braindino.train.evaluation.head_runs import train_heads
    from braindino.train.heads.config import HeadTrainingConfig
    from braindino.train.pretraining.recipe import PretrainConfig
    from braindino.train.release.cards import backbone_card

    results = train_heads(HeadTrainingConfig(task="classification", labels=str(synthetic_corpus / "sequences.csv"),
                                             inputs=["image"], target="contrast", size=32, num_slices=4, max_epochs=3,
                                             output_dir=str(tmp_path / "sequence")))
    metadata = assert_hub_valid_card(tmp_path / "sequence" / "model" / "README.md")
    assert metadata["pipeline_tag"] == "image-classification" and "brain-mri-classification" in metadata["tags"]
    assert results["synthetic_data"] and "synthetic-data" in metadata["tags"]
    tiny = PretrainConfig.load("tiny")
    run = {"recipe": dataclasses.asdict(tiny), "loss_terms": tiny.trained_loss_terms(),
           "model_config": BrainDinoConfig.from_preset("tiny").to_dict(), "iterations": 10, "minutes": 0.5,
           "processes": 1, "device": "cpu", "losses": {"first": 9.0, "last_10_mean": 8.0}, "num_parameters": 2_000_000,
           "manifest": {"volumes": 4, "slices": 100, "slice_size": 112, "synthetic_sources": ["synthetic"],
                        "sources": {"synthetic": {"volumes": 4, "slices": 100}}}}
    for init_format, licence in ((None, "mit"), ("dinov3", "other"), ("dinov2", "apache-2.0")):
        recipe = {**run["recipe"], "init_from": "weights" if init_format else None, "init_format": init_format}
        path = tmp_path / f"backbone-{init_format}.md"
        backbone_card({**run, "recipe": recipe}).save(path)
        assert assert_hub_valid_card(path)["license"] == licence
    card = backbone_card(run).content  # the terms and augmentation the recipe used, with their weights
    assert ("DINO (CLS, sinkhorn-knopp centring) × 1 + iBOT (masked patches) × 1 + KoLeo × 0.1; intensity augmentation "
            "with probability 0.8;") in card
    nokoleo = PretrainConfig.load("tiny-layerscale1-nokoleo-noaug")
    card = backbone_card({**run, "recipe": dataclasses.asdict(nokoleo), "loss_terms": nokoleo.trained_loss_terms()}).content
    assert "iBOT (masked patches) × 1; no intensity augmentation;" in card and "KoLeo" not in card


CARD_SECTIONS = ["## How to use", "## Training data", "## Training compute", "## Intended uses", "## Out-of-scope uses",
                 "## Bias, risks and limitations", "## Citation"]


def test_cards_carry_uses_risks_compute_citation_base_model_and_a_true_install_line(tmp_path, synthetic_corpus):
    """A real train-head run's card (exported without, then with, its pipeline code) and backbone cards from scratch and
    from a DINOv3 Hub id, read back with huggingface_hub's ModelCard: the sections a Hub user looks for, `base_model`
    where the start is a Hub id (never a local path), and how to call the folder as it was exported."""
    import dataclasses

    from huggingface_hub import ModelCard

    from braindino.train.evaluation.head_runs import train_heads
    from braindino.train.heads.config import HeadTrainingConfig
    from braindino.train.pretraining.recipe import PretrainConfig
    from braindino.train.release.cards import INSTALL, backbone_card

    for pipeline_code in (False, True):
        out = tmp_path / f"age-{pipeline_code}"
        train_heads(HeadTrainingConfig(task="regression", labels=str(synthetic_corpus / "labels.csv"), inputs=["t1"],
                                       target="age", size=32, num_slices=4, max_epochs=3, output_dir=str(out),
                                       pipeline_code=pipeline_code))
        card = ModelCard.load(out / "model" / "README.md")
        assert all(section in card.text for section in CARD_SECTIONS), card.text
        assert INSTALL in card.text and "pip install braindino" not in card.text
        assert "base_model" not in card.data.to_dict()  # a random-init preset backbone: nothing on the Hub to link
        call = f'pipeline("brain-age", model="{out / "model"}"' + (", trust_remote_code=True)" if pipeline_code else ")")
        assert call in card.text, card.text
        assert ("carries its own pipeline code" in card.text) == pipeline_code
        assert "encoded on" in card.text and "head run(s) took" in card.text
    base = PretrainConfig.load("base")
    run = {"recipe": dataclasses.asdict(base), "loss_terms": base.trained_loss_terms(),
           "model_config": BrainDinoConfig.from_preset("tiny").to_dict(), "iterations": 10, "minutes": 0.5,
           "processes": 8, "device": "cuda", "hardware": "NVIDIA H100 80GB HBM3", "losses": {"first": 9.0, "last_10_mean": 8.0},
           "num_parameters": 2_000_000, "manifest": {"volumes": 4, "slices": 100, "slice_size": 224, "sources": {
               "brats": {"volumes": 4, "slices": 100}}}}
    hub_start = {**run["recipe"], "init_from": "facebook/dinov3-vitb16-pretrain-lvd1689m"}
    local_start = {**run["recipe"], "init_from": str(tmp_path)}  # a folder that exists: not a Hub id
    for recipe, base_model in ((hub_start, "facebook/dinov3-vitb16-pretrain-lvd1689m"), (local_start, None)):
        path = tmp_path / "backbone.md"
        backbone_card({**run, "recipe": recipe}).save(path)
        card = ModelCard.load(path)
        assert card.data.to_dict().get("base_model") == base_model
        assert all(section in card.text for section in CARD_SECTIONS) and "## Licence" in card.text
        assert "10 iterations in 0.5 min on 8 process(es), NVIDIA H100 80GB HBM3, mixed precision `bf16`." in card.text
