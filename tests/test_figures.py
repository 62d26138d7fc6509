"""Report pictures: the segmentation figure (slice, predicted labels over the reference outline, PCA map) from a
real mask NIfTI, and the loss curve from a metrics.jsonl."""

import json

import numpy as np
from PIL import Image

from braindino import BrainDinoImageProcessor, BrainDinoModel
from braindino.train.evaluation.figures import loss_curve_figure, segmentation_figure
from braindino.pipelines.predict_files import predict_files


def test_segmentation_figure_and_loss_curve(head_folders, synthetic_corpus, tmp_path):
    subject = sorted(path.parent for path in synthetic_corpus.glob("*/*_seg.nii.gz"))[0]
    scan, reference = str(next(subject.glob("*_flair.nii.gz"))), str(next(subject.glob("*_seg.nii.gz")))
    predict_files("brain-tumor-segmentation", str(head_folders["segmentation"]), [scan], tmp_path)
    mask = str(next(tmp_path.glob("*_seg.nii.gz")))
    figure = segmentation_figure(scan, mask, reference, BrainDinoModel.from_pretrained(head_folders["backbone"]).eval(),
                                 BrainDinoImageProcessor.from_pretrained(head_folders["segmentation"]),
                                 tmp_path / "segmentation.png")
    pixels = np.asarray(Image.open(figure).convert("RGB"))
    assert pixels.shape[1] > 1000 and pixels.std() > 10

    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps({"iteration": i, "loss": 10 - i, "dino": 5 - i / 2,
                                                                  "ibot": 5 - i / 2, "teacher_cls_spread": 1e-3 * i,
                                                                  "student_cls_spread": 0.5}) for i in range(1, 6)))
    curve = loss_curve_figure(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert Image.open(curve).size[0] > 300
