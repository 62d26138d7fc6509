"""Each loss against the slow formula in its docstring, on small tensors."""

import math

import pytest
import torch

from braindino.train.pretraining.losses import DinoClsTokenLoss, GramLoss, IBotPatchLoss, KoLeoLoss, SoftmaxCentering, resize_patch_grid, sinkhorn_knopp


def test_sinkhorn_knopp_rows_sum_to_one_and_prototypes_are_balanced():
    torch.manual_seed(0)
    logits = torch.randn(64, 16) * 0.5 + torch.linspace(0, 1, 16)  # some prototypes favoured
    targets = sinkhorn_knopp(logits, temperature=0.1, iterations=10)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(64))
    marginal = targets.mean(dim=0)
    assert (marginal - 1 / 16).abs().max() < 0.01  # nearly uniform use of prototypes
    plain = torch.softmax(logits / 0.1, dim=-1).mean(dim=0)
    assert (plain - 1 / 16).abs().max() > 0.05  # without centring they are not


def test_sinkhorn_knopp_matches_the_loop_definition():
    torch.manual_seed(1)
    logits = torch.randn(5, 4)
    q = torch.exp(logits / 0.5).T.double()
    q /= q.sum()
    for _ in range(3):
        for k in range(4):
            q[k] /= q[k].sum() * 4
        for b in range(5):
            q[:, b] /= q[:, b].sum() * 5
    expected = (q * 5).T.float()
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.5, iterations=3), expected)


def test_dino_loss_matches_the_pair_loop():
    torch.manual_seed(2)
    batch, prototypes, global_views, local_views = 3, 7, 2, 2
    student = torch.randn((global_views + local_views) * batch, prototypes)
    teacher = torch.softmax(torch.randn(global_views * batch, prototypes), dim=-1)
    terms = []
    for u in range(global_views + local_views):
        for v in range(global_views):
            if u == v:
                continue
            log_probs = torch.log_softmax(student[u * batch : (u + 1) * batch] / 0.1, dim=-1)
            terms.append(-(teacher[v * batch : (v + 1) * batch] * log_probs).sum(dim=-1).mean())
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(DinoClsTokenLoss(0.1)(student, teacher), expected)


def test_ibot_loss_weights_every_masked_image_equally_and_divides_by_all_global_crops():
    torch.manual_seed(3)
    masks = torch.tensor([[1, 1, 0, 0, 1], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    count = int(masks.sum())
    student = torch.randn(count, 6)
    teacher = torch.softmax(torch.randn(count, 6), dim=-1)
    image_of_patch = masks.nonzero()[:, 0]
    total = 0.0
    for m in range(count):
        n = int(masks[image_of_patch[m]].sum())
        total += (1 / n) * float(-(teacher[m] * torch.log_softmax(student[m] / 0.1, dim=-1)).sum())
    expected = total / 3  # DINOv2/v3 divide by every global crop in the batch, masked or not
    assert math.isclose(float(IBotPatchLoss(0.1)(student, teacher, masks)), expected, rel_tol=1e-5)
    nothing = IBotPatchLoss()(student[:0], teacher[:0], torch.zeros(2, 5, dtype=torch.bool))
    assert float(nothing) == 0.0


def test_koleo_matches_nearest_neighbour_loop_and_is_safe_at_batch_one():
    torch.manual_seed(4)
    embeddings = torch.randn(6, 8)
    normalized = embeddings / embeddings.norm(dim=-1, keepdim=True)
    nearest = [min(float((normalized[i] - normalized[j]).norm()) for j in range(6) if j != i) for i in range(6)]
    expected = -sum(math.log(d + 1e-8) for d in nearest) / 6
    assert math.isclose(float(KoLeoLoss()(embeddings)), expected, rel_tol=1e-5)
    single = KoLeoLoss()(torch.randn(1, 8, requires_grad=True))
    assert float(single.detach()) == 0.0 and not torch.isnan(single)
    single.backward()  # still differentiable


def test_gram_loss_matches_the_element_loop_and_ignores_feature_scale():
    torch.manual_seed(5)
    student, teacher = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    s = student / student.norm(dim=-1, keepdim=True)
    t = teacher / teacher.norm(dim=-1, keepdim=True)
    total = sum(float((s[b, i] @ s[b, j] - t[b, i] @ t[b, j]) ** 2) for b in range(2) for i in range(4) for j in range(4))
    assert math.isclose(float(GramLoss()(student, teacher)), total / 32, rel_tol=1e-5)
    assert float(GramLoss()(student * 3.0, student)) < 1e-10


def test_gram_teacher_features_resize_to_the_student_grid_as_dinov3_resamples_them():
    """Bicubic with align_corners=False reproduces a linear ramp exactly away from the border: a 16 x 16 grid brought
    to 8 x 8 samples the fine grid at 2p + 0.5. Rows and columns get different slopes in every channel, so a
    transposed or column-major layout fails; the border (clamped taps) is left out."""
    y, x = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    slopes = torch.tensor([[1.0, 0.1], [-0.5, 2.0], [0.0, 3.0]])  # [D, (row, column)]
    fine = (slopes[:, :1, None] * y + slopes[:, 1:, None] * x).flatten(1).T[None]  # [1, 256, 3], row-major
    coarse = resize_patch_grid(fine, 8).view(8, 8, 3)
    positions = 2 * torch.arange(8.0) + 0.5
    expected = slopes[:, 0] * positions[:, None, None] + slopes[:, 1] * positions[None, :, None]
    torch.testing.assert_close(coarse[1:-1, 1:-1], expected[1:-1, 1:-1], atol=1e-4, rtol=0)
    assert resize_patch_grid(fine, 16) is fine  # same grid: untouched
    with pytest.raises(ValueError, match="not a square grid"):
        resize_patch_grid(fine[:, :255], 8)


def test_softmax_centering_moves_the_centre_towards_the_batch_mean():
    centering = SoftmaxCentering(num_prototypes=3, momentum=0.5)
    logits = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 2.0]])
    targets = centering(logits, temperature=1.0)
    torch.testing.assert_close(targets, torch.softmax(logits, dim=-1))  # first call: centre was 0
    torch.testing.assert_close(centering.center, torch.tensor([[1.0, 0.0, 0.5]]))


def _reference_dinov3_total(student_global, student_local, teacher_probs, student_masked, teacher_masked, masks,
                            cls_pre_head, weights, student_temperature=0.1):
    """DINOv3's `compute_losses`, transcribed from its formulas (not its code): shapes [G, B, K], [L, B, K], [G, B, K],
    [M, K], [M, K], [G * B, N], [G, B, D]."""
    G, B, _ = student_global.shape
    L = student_local.shape[0]

    def cross_entropy(student, teacher):  # summed over prototypes, per sample
        return -(teacher * torch.log_softmax(student / student_temperature, dim=-1)).sum(-1)

    local = sum(float(cross_entropy(student_local[s], teacher_probs[t]).sum()) for s in range(L) for t in range(G)) / (B * L * G)
    global_ = sum(float(cross_entropy(student_global[s], teacher_probs[t]).sum())
                  for s in range(G) for t in range(G) if s != t) / (B * G * (G - 1))
    global_terms, local_terms = G * (G - 1), G * L
    dino = (local_terms * local + global_terms * global_) / (global_terms + local_terms)
    koleo = sum(float(KoLeoLoss()(cls_pre_head[g])) for g in range(G)) / G
    per_image = masks.sum(-1)
    image_of_patch = masks.nonzero()[:, 0]
    ibot = sum(float(cross_entropy(student_masked[m], teacher_masked[m])) / float(per_image[image_of_patch[m]])
               for m in range(len(student_masked))) / masks.shape[0]
    return weights["dino"] * dino + weights["koleo"] * G * koleo + weights["ibot"] * ibot, koleo


@pytest.mark.parametrize("masked_crops", [[0, 3], [2]], ids=["some global crops unmasked", "one masked image"])
def test_total_loss_is_composed_as_dinov3_composes_it(masked_crops):
    """The loop's total against DINOv3's composition on the same model outputs: DINO's pair scales, iBOT over all
    global crops, KoLeo x 2 global crops; with 2 of 4 global crops masked, and with a single masked image."""
    from braindino.train.pretraining.recipe import PretrainConfig
    from braindino.train.pretraining.self_distillation import SelfDistillation, build_student

    from conftest import MICRO_MODEL

    recipe = PretrainConfig(preset="tiny", model_overrides={**MICRO_MODEL, "layerscale_value": 1.0,
                                                            "rope_rescale_coords": None})
    torch.manual_seed(0)
    model = SelfDistillation(build_student(recipe), recipe).train()
    masks = torch.zeros(4, 4, dtype=torch.bool)  # 2 global crops x batch 2, 2 x 2 patches each
    for crop in masked_crops:
        masks[crop, : crop + 1] = True
    batch = {"global_crops": torch.randn(4, 3, 32, 32), "local_crops": torch.randn(6, 3, 16, 16), "masks": masks}
    losses = model(batch, teacher_temperature=0.04)

    from braindino.train.pretraining.losses import sinkhorn_knopp

    with torch.no_grad():
        teacher = model.teacher(batch["global_crops"], patch_positions=masks)
        student = model.student(batch["global_crops"], bool_masked_pos=masks, patch_positions=masks)
        local = model.student(batch["local_crops"])
    expected, koleo = _reference_dinov3_total(
        student.cls_logits.unflatten(0, (2, 2)), local.cls_logits.unflatten(0, (3, 2)),
        sinkhorn_knopp(teacher.cls_logits, 0.04).unflatten(0, (2, 2)), student.masked_patch_logits,
        sinkhorn_knopp(teacher.masked_patch_logits, 0.04), masks, student.cls_tokens.unflatten(0, (2, 2)),
        model.loss_weights)
    per_crop = [float(KoLeoLoss()(view)) for view in student.cls_tokens.unflatten(0, (2, 2))]
    assert abs(per_crop[0] - per_crop[1]) > 1e-3  # the two global crops' KoLeo differ: mean vs sum matters
    assert float(losses["koleo"].detach()) == pytest.approx(koleo, rel=1e-5)
    assert float(losses["loss"].detach()) == pytest.approx(expected, rel=1e-5)
