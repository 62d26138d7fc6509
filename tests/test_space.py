"""The Gradio Space as a real process on loopback, driven with gradio_client: each task returns a sane result and
a bad file gets a readable message (not a stack trace)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

gradio_client = pytest.importorskip("gradio_client")  # the Space extra; installed by the test extra

APP = Path(__file__).resolve().parents[1] / "spaces" / "app.py"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def space(head_folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("space")
    config = {"brain_age": str(head_folders["age"]), "classification": str(head_folders["sequence"]),
              "segmentation": str(head_folders["segmentation"]), "backbone": str(head_folders["backbone"])}
    (root / "models.json").write_text(json.dumps(config))
    port = _free_port()
    env = {**os.environ, "BRAINDINO_SPACE_CONFIG": str(root / "models.json"), "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen([sys.executable, str(APP)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    client = None
    while time.time() < deadline and client is None:
        if process.poll() is not None:
            pytest.fail(f"the Space exited: {process.stdout.read()[-3000:]}")
        try:
            client = gradio_client.Client(url, verbose=False)
        except Exception:  # not listening yet
            time.sleep(1)
    assert client is not None, "the Space did not start within 180 s"
    yield client, root, url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def scan(synthetic_corpus):
    return str(sorted(synthetic_corpus.glob("*/*_seg.nii.gz"))[0]).replace("_seg.nii.gz", "_flair.nii.gz")


def test_every_task_returns_a_sane_result(space, scan, head_folders):
    client, _, _ = space
    import braindino  # noqa: F401  (registers the pipeline tasks)
    from gradio_client import handle_file
    from transformers import pipeline

    slider, view, info = client.predict(handle_file(scan), api_name="/load")
    assert "axial slices" in info and "not for clinical decisions" in info
    age = client.predict(handle_file(scan), api_name="/brain_age")
    assert age == pipeline("brain-age", model=str(head_folders["age"]))(scan)  # the exported head's own answer, 8 slices
    assert age["num_slices"] == 8
    classes = client.predict(handle_file(scan), api_name="/classify")
    assert {entry["label"] for entry in classes["confidences"]} == {"flair", "t1", "t1ce", "t2"}
    overlay, volumes, mask_file = client.predict(handle_file(scan), 20, api_name="/segment")
    assert set(volumes) >= {"whole_tumor", "tumor_core", "enhancing_tumor"}
    mask = nib.load(mask_file)
    np.testing.assert_array_equal(mask.affine, nib.load(scan).affine)
    assert mask.shape == nib.load(scan).shape
    assert overlay["image"] and len(overlay["annotations"]) == 3
    # the slice view is the scan's own axial slice (rows A→P, columns R→L of its 1 mm-ish grid), not the model canvas
    from PIL import Image

    shown = np.asarray(Image.open(view["image"]["path"] if isinstance(view["image"], dict) else view["image"]))
    x, y, _ = nib.load(scan).shape  # the synthetic scans are RAS-oriented
    assert shown.shape[:2] == (y, x)
    pca, attention = client.predict(handle_file(scan), 20, api_name="/representation")
    pca, attention = np.asarray(Image.open(pca)), np.asarray(Image.open(attention))
    assert pca.shape == attention.shape == (448, 448, 3)  # 28 x 28 patches, whatever the backbone trained at
    patch_colours = pca[8::16, 8::16].reshape(-1, 3)  # one pixel per patch centre
    assert len(np.unique(patch_colours, axis=0)) > 50  # a map of the patches, not a few blocks
    assert attention.reshape(-1, 3).std(axis=0).max() > 10


def test_a_scan_with_skull_is_flagged_and_the_box_strips_it_before_every_tab(space, head_folders):
    client, _, _ = space
    from gradio_client import handle_file
    from test_skull_check import PYDEFACE_HEAD
    from transformers import pipeline

    _, _, info = client.predict(handle_file(str(PYDEFACE_HEAD)), False, api_name="/load")
    assert "**Warning** — mean_reg2mean.nii.gz: does not look skull-stripped" in info and "skull-strip first" in info
    assert "/tmp" not in info  # the upload's name, not the server's path
    raw_age = client.predict(handle_file(str(PYDEFACE_HEAD)), False, api_name="/brain_age")
    assert raw_age["skull_stripped"] is False
    _, _, info = client.predict(handle_file(str(PYDEFACE_HEAD)), True, api_name="/load")
    assert "(brain extracted)" in info and "Warning" not in info
    age = client.predict(handle_file(str(PYDEFACE_HEAD)), True, api_name="/brain_age")
    assert age["skull_stripped"] is True and "warnings" not in age
    assert age != raw_age


def test_a_zip_of_a_dicom_series_loads_like_a_nifti(space, tmp_path):
    import zipfile

    from conftest import rotation_matrix, write_dicom_series
    from gradio_client import handle_file

    client, _, _ = space
    stored = np.zeros((40, 36, 12), dtype=np.int16)
    stored[5:35, 4:32, 1:11] = np.random.default_rng(0).integers(400, 2400, size=(30, 28, 10))
    write_dicom_series(tmp_path / "series", stored, (1.2, 1.0, 2.5), rotation_matrix(0, 0), (0.0, 0.0, 0.0))
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted((tmp_path / "series").iterdir()):
            handle.write(path, f"DICOM/{path.name}")
    _, _, info = client.predict(handle_file(str(archive)), api_name="/load")
    assert "12 axial slices" in info and "(40, 36, 12)" in info


def test_bad_file_gets_a_readable_message_naming_the_uploaded_file_only(space, tmp_path):
    """The message names the file as the user uploaded it, never the server's upload path (Gradio's upload folder,
    a hash, then the name) or the folder a zip was unpacked into."""
    import tempfile
    import zipfile

    client, root, _ = space
    from gradio_client import handle_file

    bad = root / "broken.nii.gz"
    bad.write_bytes(b"this is not a NIfTI volume")
    with zipfile.ZipFile(tmp_path / "not-dicom.zip", "w") as archive:
        archive.writestr("a.dcm", b"not a DICOM file")
    for upload, api_name in ((bad, "/brain_age"), (bad, "/load"), (tmp_path / "not-dicom.zip", "/load")):
        with pytest.raises(Exception) as raised:
            client.predict(handle_file(str(upload)), api_name=api_name)
        message = str(raised.value)
        assert upload.name in message and "Traceback" not in message, message
        assert tempfile.gettempdir() not in message and "gradio" not in message.lower(), message
    assert "NIfTI" in message or "DICOM" in message


CHROMIUM = "/usr/bin/chromium"  # Debian's browser: `playwright install` downloads one and fails offline


def test_browser_uploads_a_scan_segments_it_and_shows_the_overlay(space, scan, tmp_path):
    """Headless Chromium, driven by Playwright, does what a user does; the screenshot is kept for a human look."""
    assert Path(CHROMIUM).exists(), "the browser test needs Debian's chromium: apt-get install chromium"
    from playwright.sync_api import sync_playwright

    _, _, url = space
    screenshot = tmp_path / "space-segmentation.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        page.locator("input[type=file]").first.set_input_files(scan)
        page.get_by_text("axial slices").wait_for(timeout=120_000)
        page.get_by_role("tab", name="Tumour segmentation").click()
        page.get_by_role("button", name="Segment").click()
        page.get_by_text("whole_tumor").wait_for(timeout=120_000)
        page.screenshot(path=str(screenshot), full_page=True)
        page.get_by_role("tab", name="Representation").click()
        page.get_by_role("button", name="Show patch features and attention (448 px)").click()
        maps = page.locator("#pca-map img, #attention-map img")
        maps.nth(1).wait_for(timeout=120_000)
        sizes = [maps.nth(number).bounding_box() for number in range(maps.count())]
        page.screenshot(path=str(tmp_path / "space-representation.png"), full_page=True)
        browser.close()
    from PIL import Image

    image = np.asarray(Image.open(screenshot).convert("RGB"))
    assert image.shape[1] == 1280 and image.std() > 10  # a rendered page, not a blank one
    assert len(sizes) == 2 and all(box["width"] >= 300 and box["height"] >= 300 for box in sizes), sizes  # readable



REPO = APP.parents[1]


@pytest.mark.slow
def test_the_space_runs_in_a_fresh_venv_from_its_requirements(head_folders, scan, tmp_path):
    """A new virtual environment with the Space's own requirements.txt only (torch and the package's wheel with its
    Space extra, no training extra), as the Hub builds it: `import braindino`, then
    the Space builds, shows its example (the MNI152 template when none is configured) and predicts a brain age."""
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    # --no-compile: byte-compiling every installed module took half of the install (135 s → 62 s here); the run
    # below compiles only what it imports.
    install = [str(python), "-m", "pip", "install", "-q", "--no-compile"]
    # As the Hub builds the Space: its folder with the package's wheel beside app.py, then its requirements.txt.
    space = tmp_path / "space"
    shutil.copytree(APP.parent, space)
    wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(space), str(REPO)]
    for command in (wheel, [sys.executable, "-m", "venv", str(venv)], [*install, "-r", "requirements.txt"]):
        installed = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=space)
        assert installed.returncode == 0, installed.stderr[-3000:]
    missing = subprocess.run([str(python), "-c", "import datasets"], capture_output=True, text=True)
    assert missing.returncode != 0  # the training extra really is absent
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"brain_age": str(head_folders["age"]), "backbone": str(head_folders["backbone"])}))
    code = ("import runpy, braindino\n"
            f"app = runpy.run_path({str(APP)!r})\n"
            "app['build_demo']()\n"
            "example, label = app['example_scan']()\n"
            "assert label == 'MNI152 T1 template' and example.endswith('.nii.gz'), (example, label)\n"
            f"print('age', app['brain_age']({scan!r})['age'])\n")
    result = subprocess.run([str(python), "-c", code], env={**os.environ, "BRAINDINO_SPACE_CONFIG": str(config)},
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "age " in result.stdout
