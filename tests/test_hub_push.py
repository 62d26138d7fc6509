"""Share an exported head through the Hub's HTTP contract and load it back: `braindino push-to-hub` uploads with
the real `huggingface_hub` client to a loopback server (tests/hub_server.py), a fresh process runs
`pipeline("brain-age", model="tester/...", trust_remote_code=True)` from the Hub id, and a third loads it again
with HF_HUB_OFFLINE=1 from the cache. The server proves our side of the protocol, not the Hub's own behaviour."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from braindino import BrainDinoConfig, BrainDinoForRegression, BrainDinoImageProcessor
from braindino.train.release.cards import write_head_card
from braindino.pipelines import export_head
from hub_server import start_hub_server


@pytest.fixture
def hub(tmp_path):
    server, url = start_hub_server()
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_loopback_token",
           "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1"}
    yield server.RequestHandlerClass.state, env
    server.shutdown()


def test_push_then_pipeline_from_the_hub_id_then_offline(hub, tmp_path, synthetic_corpus):
    state, env = hub
    torch.manual_seed(0)
    config = BrainDinoConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                             num_labels=1, target_mean=[50.0], target_std=[10.0], contrasts=["t1"])
    folder = export_head(BrainDinoForRegression(config).eval(), BrainDinoImageProcessor(size=32, num_slices=8),
                         "regression", tmp_path / "age", pipeline_code=True)  # for Hub users without the package
    results = {"task": "regression", "target": "age", "inputs": ["t1"], "backbone": "test backbone",
               "random_init": True, "labels": str(synthetic_corpus / "labels.csv"), "synthetic_data": True,
               "samples": 10, "protocol": "test", "config": {"learning_rate": 1e-3, "weight_decay": 1e-4,
               "patience": 3, "min_epochs": 2, "max_epochs": 5, "label_fractions": [1.0], "folds": 1, "seeds": [0]},
               "summary": {"1.0": {"mae": {"mean": 9.5, "std": 0.0, "n": 1}}},
               "runs": [{"label_fraction": 1.0, "fold": 0, "seed": 0, "train": 6, "epochs": 5, "train_seconds": 0.1}],
               "hardware": "x86_64 CPU, 2 cores", "backbone_dtype": "float32", "seconds": 3.0,
               "exported_model": {"run": "fraction1-fold0-seed0"}}
    write_head_card(results, folder, model_id="tester/brain-age")

    pushed = subprocess.run([sys.executable, "-m", "braindino.train.cli", "push-to-hub", str(folder), "tester/brain-age"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    stored = state.repos["tester/brain-age"]["files"]
    assert {"config.json", "model.safetensors", "README.md", "brain_mri.py", "modeling_braindino.py",
            "preprocessor_config.json"} <= set(stored)
    assert stored["model.safetensors"] == (folder / "model.safetensors").read_bytes()  # went through LFS intact

    scan = str(next(synthetic_corpus.glob("*/*_t1.nii.gz")))
    local = pipeline_age(folder, scan)
    script = textwrap.dedent(f"""
        from transformers import pipeline
        from huggingface_hub import ModelCard
        predict = pipeline("brain-age", model="tester/brain-age", trust_remote_code=True)
        card = ModelCard.load("tester/brain-age")
        assert card.data.eval_results[0].metric_value == 9.5, card.data.eval_results
        print(predict({scan!r})["age"])
    """)
    online = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert online.returncode == 0, online.stderr[-3000:]
    assert float(online.stdout.strip().splitlines()[-1]) == pytest.approx(local, abs=0.01)

    offline_env = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there
    offline = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=offline_env)
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert float(offline.stdout.strip().splitlines()[-1]) == pytest.approx(local, abs=0.01)


def pipeline_age(folder, scan) -> float:
    from transformers import pipeline

    return pipeline("brain-age", model=str(folder), trust_remote_code=True)(scan)["age"]  # its custom_pipelines ask
