import math

import pytest
import torch
import torch.nn.functional as F

from clips4.trainer.losses import (
    CLIPS4Loss,
    LossConfig,
    MemoryBank,
    Prototypes,
    contrastive_loss,
    grid_init,
    logit_adjustment_bias,
    segment_majority,
    segment_means,
    semantic_consistency_loss,
    spherical_kmeans,
    teacher_class_marginal,
    text_distillation_loss,
)

H, W, D = 12, 12, 16


def _quadrants(n_img=2):
    """labels (2n,H,W): 4 quadrant regions per image, both views identical; image_index (2n,)."""
    q = (torch.arange(H)[:, None] >= H // 2).long() * 2 + (torch.arange(W)[None, :] >= W // 2).long()
    labels = q.expand(2 * n_img, H, W).clone()
    image_index = torch.arange(n_img).repeat_interleave(2)
    return labels, image_index


def _region_embeddings(labels, image_index, dirs, noise=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = dirs[image_index[:, None, None] * 4 + labels]  # (N,H,W,D)
    z = z + noise * torch.randn(z.shape, generator=g)
    return F.normalize(z.permute(0, 3, 1, 2), dim=1)


def test_grid_init_and_kmeans_deterministic():
    g = grid_init(12, 18, 36)
    assert g.shape == (12, 18) and set(g.unique().tolist()) == set(range(36))
    z = F.normalize(torch.randn(2, D, H, W, generator=torch.Generator().manual_seed(0)), dim=1)
    a = spherical_kmeans(z, 9, iters=5, spatial_weight=0.5)
    b = spherical_kmeans(z.clone(), 9, iters=5, spatial_weight=0.5)
    assert a.shape == (2, H, W) and a.dtype == torch.int64 and torch.equal(a, b)
    assert a.min() >= 0 and a.max() < 9


def test_kmeans_recovers_piecewise_constant_regions():
    labels, image_index = _quadrants(1)
    dirs = F.normalize(torch.randn(4, D, generator=torch.Generator().manual_seed(1)), dim=1)
    z = _region_embeddings(labels, image_index, dirs, noise=0.05)
    assign = spherical_kmeans(z, 4, iters=10)
    for s in assign.unique():  # every segment is pure
        assert labels[assign == s].unique().numel() == 1


def test_segment_means_and_majority():
    z = F.normalize(torch.randn(1, D, 4, 4), dim=1).requires_grad_()
    assign = torch.zeros(1, 4, 4, dtype=torch.long)
    assign[:, :, 2:] = 1
    v, counts = segment_means(z, assign, 3)
    assert v.shape == (1, 3, D) and counts.tolist() == [[8.0, 8.0, 0.0]]
    assert torch.allclose(v[0, 0], F.normalize(z[0, :, :, :2].sum((1, 2)), dim=0))
    v.sum().backward()
    assert z.grad.abs().sum() > 0
    labels = torch.tensor([[[5, 5, 7, -1]] * 4])
    labels[0, 0, 0] = 9
    assert segment_majority(labels, assign, 3).tolist() == [[5, 7, -1]]


def test_contrastive_lower_for_region_consistent_embeddings():
    labels, image_index = _quadrants(2)
    dirs = F.normalize(torch.randn(8, D, generator=torch.Generator().manual_seed(2)), dim=1)
    good = _region_embeddings(labels, image_index, dirs, noise=0.05)
    rand = F.normalize(torch.randn(good.shape, generator=torch.Generator().manual_seed(3)), dim=1)
    losses = {}
    for name, z in (("good", good), ("rand", rand)):
        z = z.clone().requires_grad_()
        assign = spherical_kmeans(z, 9, spatial_weight=1.0)
        loss, v, counts, seg_lab = contrastive_loss(z, labels, image_index, assign, 9, kappa=10.0)
        assert torch.isfinite(loss)
        loss.backward()
        assert z.grad.abs().sum() > 0
        losses[name] = float(loss.detach())
    assert losses["good"] < losses["rand"] - 0.5, losses


def test_contrastive_ignores_ignored_pixels():
    labels, image_index = _quadrants(1)
    z = F.normalize(torch.randn(2, D, H, W), dim=1)
    assign = spherical_kmeans(z, 4)
    all_ignored = torch.full_like(labels, -1)
    loss, *_ = contrastive_loss(z, all_ignored, image_index, assign, 4, kappa=10.0)
    assert float(loss) == 0.0


def test_memory_bank_keeps_two_batches():
    bank = MemoryBank(2)
    assert bank.get() is None
    for i in range(3):
        bank.push(torch.full((i + 1, 4), float(i), requires_grad=True))
    got = bank.get()
    assert len(bank) == 2 and got.shape == (2 + 3, 4) and not got.requires_grad
    assert got[:2].eq(1).all() and got[2:].eq(2).all()
    restored = MemoryBank(0)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.get(), got)


def test_embedding_consistency_zero_when_equal():
    labels, image_index = _quadrants(1)
    z = F.normalize(torch.randn(2, D, H, W), dim=1)
    loss_fn = CLIPS4Loss(LossConfig(w_t=0, w_s=0, w_u=0, n_segments=4))
    total, parts = loss_fn(z, labels, image_index, clip=z.clone())
    assert abs(parts["L_e"]) < 1e-5 and abs(parts["avgsim"] - 1) < 1e-5


def test_semantic_pseudo_labels_are_argmax():
    g = torch.Generator().manual_seed(4)
    C = F.normalize(torch.randn(5, D, generator=g), dim=1)
    i = F.normalize(torch.randn(2, 3, D, generator=g), dim=2)
    v = F.normalize(torch.randn(2, 3, D, generator=g), dim=2).requires_grad_()
    valid = torch.ones(2, 3, dtype=torch.bool)
    valid[1, 2] = False
    loss, pseudo, _ = semantic_consistency_loss(v, i, valid, C, temperature=10.0)
    assert torch.equal(pseudo, (i[valid] @ C.t()).argmax(1))
    loss.backward()
    assert v.grad.abs().sum() > 0
    aligned, _, _ = semantic_consistency_loss(C[pseudo].view(-1, D)[None], i[valid][None], valid[valid][None], C, 10.0)
    assert float(aligned) < float(loss.detach())


def test_pseudo_label_modes():
    """weighted: confident segments count more; soft: the teacher's distribution is the target; aligned: a class
    the student has stopped predicting while the teacher still gives it mass gets its most likely segments back."""
    C = torch.eye(3, D)  # three orthogonal prototypes
    mix = lambda a, b, c: F.normalize(torch.tensor([a, b, c] + [0.0] * (D - 3)), dim=0)  # noqa: E731
    # six segments: the teacher leans to class 2 on all, but segments 0-2 carry more class-1 mass than 3-5
    i = torch.stack([mix(0.0, 0.45, 0.55)] * 3 + [mix(0.0, 0.1, 0.9)] * 3)[None]
    v = torch.stack([mix(0.0, 0.0, 1.0)] * 6)[None].requires_grad_()  # the student: class 2 everywhere
    valid = torch.ones(1, 6, dtype=torch.bool)
    hard, pseudo, _ = semantic_consistency_loss(v, i, valid, C, 10.0, "hard")
    assert pseudo.tolist() == [2] * 6
    for mode in ("weighted", "soft", "aligned"):
        loss, p2, _ = semantic_consistency_loss(v, i, valid, C, 10.0, mode)
        assert torch.equal(p2, pseudo) and torch.isfinite(loss)  # the reported pseudo-labels stay the argmax
    # aligned: the student's class-1 marginal is far below the teacher's, so segments 0-2 (most class-1) move to it
    aligned, _, _ = semantic_consistency_loss(v, i, valid, C, 10.0, "aligned")
    expect = F.cross_entropy(10.0 * v[0].detach() @ C.t(), torch.tensor([1, 1, 1, 2, 2, 2]))
    assert torch.allclose(aligned.detach(), expect)
    # weighted: a student wrong exactly where the teacher is unsure (0-2) pays less than with hard labels
    v2 = torch.stack([mix(0.0, 1.0, 0.0)] * 3 + [mix(0.0, 0.0, 1.0)] * 3)[None]
    weighted, _, _ = semantic_consistency_loss(v2, i, valid, C, 10.0, "weighted")
    hard2, _, _ = semantic_consistency_loss(v2, i, valid, C, 10.0, "hard")
    assert float(weighted) < float(hard2)
    with pytest.raises(ValueError, match="aligned"):
        semantic_consistency_loss(v, i, valid, C, 10.0, "nope")


def test_soft_target_temperature_sharpens_towards_hard():
    """``target_temperature`` τ_q: None is τ (plain soft); a larger τ_q moves the soft loss towards the hard one."""
    C = torch.eye(3, D)
    mix = lambda a, b, c: F.normalize(torch.tensor([a, b, c] + [0.0] * (D - 3)), dim=0)  # noqa: E731
    i = torch.stack([mix(0.0, 0.45, 0.55)] * 3 + [mix(0.0, 0.1, 0.9)] * 3)[None]  # the teacher: 2, unsure on 0-2
    v = torch.stack([mix(0.0, 1.0, 0.0)] * 3 + [mix(0.0, 0.0, 1.0)] * 3)[None]  # the student: 1 on 0-2, then 2
    valid = torch.ones(1, 6, dtype=torch.bool)
    hard, _, _ = semantic_consistency_loss(v, i, valid, C, 10.0, "hard")
    soft, _, _ = semantic_consistency_loss(v, i, valid, C, 10.0, "soft")
    same, _, _ = semantic_consistency_loss(v, i, valid, C, 10.0, "soft", target_temperature=10.0)
    sharp, _, _ = semantic_consistency_loss(v, i, valid, C, 10.0, "soft", target_temperature=30.0)
    sharpest, _, _ = semantic_consistency_loss(v, i, valid, C, 10.0, "soft", target_temperature=1e4)
    assert torch.allclose(soft, same)
    assert float(soft) < float(sharp) < float(hard)  # the student's class 1 on 0-2 costs more as targets sharpen
    assert torch.allclose(sharpest, hard, atol=1e-4)


def test_full_loss_finite_grads_and_switches():
    labels, image_index = _quadrants(2)
    g = torch.Generator().manual_seed(5)
    z = F.normalize(torch.randn(4, D, H, W, generator=g), dim=1).requires_grad_()
    clip = F.normalize(torch.randn(4, D, 3, 3, generator=g), dim=1)  # coarse grid: resampled inside
    protos = Prototypes(F.normalize(torch.randn(3, D, generator=g), dim=1), F.normalize(torch.randn(4, D, generator=g), dim=1))
    loss_fn = CLIPS4Loss(LossConfig(n_segments=9), protos)
    for step in range(3):
        total, parts = loss_fn(z, labels, image_index, clip=clip)
        assert math.isfinite(float(total.detach())) and all(math.isfinite(parts[k]) for k in ("L_t", "L_e", "L_s", "L_u"))
        z.grad = None
        protos.unknown.grad = None
        total.backward()
        assert z.grad.abs().sum() > 0
    assert len(loss_fn.memory) == 2
    assert protos.unknown.grad is not None and parts["frac_unknown"] >= 0
    # ablation switches: only L_t
    only_t = CLIPS4Loss(LossConfig(w_e=0, w_s=0, w_u=0, n_segments=9))
    total, parts = only_t(z, labels, image_index)
    assert parts["L_e"] == 0 and parts["L_s"] == 0 and parts["L_t"] > 0
    with pytest.raises(ValueError, match="prototypes"):
        CLIPS4Loss(LossConfig())
    with pytest.raises(ValueError, match="CLIP"):
        CLIPS4Loss(LossConfig(w_s=0, w_u=0))(z, labels, image_index)


def test_text_distillation_is_minimal_at_the_teachers_class_text_distribution():
    g = torch.Generator().manual_seed(3)
    text = F.normalize(torch.randn(3, D, generator=g), dim=1)
    i = F.normalize(torch.randn(2, 6, D, generator=g), dim=-1)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    q = torch.softmax(100 * i[valid] @ text.t(), 1)
    entropy = float(-(q * q.clamp_min(1e-30).log()).sum(1).mean())
    # at v = i the loss is the teacher's entropy (its minimum); a student off the teacher's ranking pays more
    assert abs(float(text_distillation_loss(i, i, valid, text, 100.0)) - entropy) < 1e-4
    v = F.normalize(i + 0.5 * torch.randn(i.shape, generator=g), dim=-1).requires_grad_()
    loss = text_distillation_loss(v, i.clone().requires_grad_(), valid, text, 100.0)
    assert float(loss.detach()) > entropy + 0.05
    loss.backward()
    assert v.grad[valid].abs().sum() > 0 and v.grad[~valid].abs().sum() == 0
    assert float(text_distillation_loss(i, i, torch.zeros_like(valid), text, 100.0)) == 0
    # in CLIPS4Loss: only with the texts, reported as L_x and part of the total
    labels, image_index = _quadrants(1)
    z = F.normalize(torch.randn(2, D, H, W, generator=g), dim=1).requires_grad_()
    clip = F.normalize(torch.randn(2, D, H, W, generator=g), dim=1)
    with pytest.raises(ValueError, match="text embeddings"):
        CLIPS4Loss(LossConfig(w_s=0, w_u=0, w_x=1.0))
    off = CLIPS4Loss(LossConfig(w_s=0, w_u=0, n_segments=4))
    on = CLIPS4Loss(LossConfig(w_s=0, w_u=0, w_x=2.0, n_segments=4), text=text)
    t_off, p_off = off(z, labels, image_index, clip=clip)
    t_on, p_on = on(z, labels, image_index, clip=clip)
    assert "L_x" not in p_off and p_on["L_x"] > 0
    assert abs(float(t_on.detach()) - float(t_off.detach()) - 2.0 * p_on["L_x"]) < 1e-4


def test_unknown_prototypes_move_towards_their_segments():
    g = torch.Generator().manual_seed(6)
    target = F.normalize(torch.randn(D, generator=g), dim=0)
    known = F.normalize(torch.randn(2, D, generator=g), dim=1)
    unk = F.normalize(target + 0.8 * torch.randn(D, generator=g), dim=0)[None]
    labels, image_index = _quadrants(1)
    z = F.normalize(torch.randn(2, D, H, W, generator=g), dim=1)
    clip = target.view(1, D, 1, 1).expand(2, D, H, W)
    protos = Prototypes(known, unk)
    loss_fn = CLIPS4Loss(LossConfig(n_segments=4), protos)
    opt = torch.optim.SGD(protos.parameters(), lr=0.5)
    before = float(protos()[2].detach() @ target)
    for _ in range(5):
        total, parts = loss_fn(z, labels, image_index, clip=clip)
        opt.zero_grad()
        total.backward()
        opt.step()
        protos.renormalize_()
    assert parts["frac_unknown"] == 1.0 and float(protos()[2].detach() @ target) > before
    # EMA variant, no optimiser
    protos2 = Prototypes(known, unk)
    ema = CLIPS4Loss(LossConfig(n_segments=4, unknown_update="ema", ema_momentum=0.5), protos2)
    ema(z, labels, image_index, clip=clip)
    assert float(protos2()[2].detach() @ target) > before


def test_logit_adjustment_gives_back_a_class_whose_teacher_plurality_is_wrong():
    """Two near-duplicate classes A (0) and B (1) and a distinct class 2: the teacher reads A's segments closer to B
    than to A (its plurality on A is wrong), B's clearly as B. Over the cells the teacher over-predicts B, so the
    logit adjustment by its own class marginal lowers B and raises A: A's segments go back to A, B's stay B, and
    class 2 (at its share) is untouched."""
    C = torch.eye(3, D)
    mix = lambda a, b, c: F.normalize(torch.tensor([a, b, c] + [0.0] * (D - 3)), dim=0)  # noqa: E731
    seg_a, seg_b, seg_c = mix(0.7, 0.71, 0.0), mix(0.2, 0.98, 0.0), mix(0.0, 0.1, 0.99)
    # the teacher's cells: a third of the image is A, a third B, a third class 2; two thirds of A's read as B
    cells = torch.stack([mix(1.0, 0.3, 0.0)] * 10 + [seg_a] * 20 + [seg_b] * 30 + [seg_c] * 30)
    pi = teacher_class_marginal([cells[:45].numpy(), cells[45:].view(3, 15, D)], C)  # any leading shape
    assert pi.tolist() == pytest.approx([1 / 9, 5 / 9, 1 / 3])
    bias = logit_adjustment_bias(pi, alpha=1.0, n_total=4)  # + one unknown prototype, never adjusted
    assert bias[1] < 0 < bias[0] and bias[2] == pytest.approx(0.0) and bias[3] == 0
    protos = torch.cat([C, F.normalize(torch.ones(1, D), dim=1)])
    i = torch.stack([seg_a, seg_b, seg_c])[None]
    v = i.clone().requires_grad_()
    valid = torch.ones(1, 3, dtype=torch.bool)
    _, plain, _ = semantic_consistency_loss(v, i, valid, protos, 10.0)
    assert plain.tolist() == [1, 1, 2]  # the paper's pseudo-labels: A is called B
    loss, adjusted, _ = semantic_consistency_loss(v, i, valid, protos, 10.0, bias=bias)
    assert adjusted.tolist() == [0, 1, 2] and torch.isfinite(loss)
    # the same through the loss module: the weight 0 (default) adjusts nothing
    cfg = LossConfig(w_t=0, w_e=0, w_u=0, n_segments=1, logit_adjustment=1.0)
    loss_fn = CLIPS4Loss(cfg, Prototypes(C, protos[3:]))
    assert torch.allclose(loss_fn.set_teacher_prior(pi), bias) and loss_fn.pseudo_bias is not None
    off = CLIPS4Loss(LossConfig(w_t=0, w_e=0, w_u=0, n_segments=1), Prototypes(C, protos[3:]))
    off.set_teacher_prior(pi)
    assert LossConfig().logit_adjustment == 0 and off.pseudo_bias is None
    with pytest.raises(ValueError, match="classes"):
        loss_fn.set_teacher_prior(pi[:2])


def test_collapse_guard_raises_a_class_the_student_stopped_predicting_and_lowers_none():
    """The student says class 1 on every segment although the teacher gives class 0 a third of its cells: the
    guard's bias on class 0 grows step by step until the segments the teacher places relatively closest to class 0
    are pseudo-labelled 0 again; class 1 and 2 are never pushed below their own logits; off (0) it does nothing."""
    C = torch.eye(3, D)
    mix = lambda a, b, c: F.normalize(torch.tensor([a, b, c] + [0.0] * (D - 3)), dim=0)  # noqa: E731
    i = torch.stack([mix(0.66, 0.75, 0.0)] * 4 + [mix(0.1, 0.99, 0.0)] * 4 + [mix(0.0, 0.1, 0.99)] * 4)[None]
    v = torch.stack([mix(0.0, 1.0, 0.0)] * 8 + [mix(0.0, 0.0, 1.0)] * 4)[None]  # the student: never class 0
    valid = torch.ones(1, 12, dtype=torch.bool)
    pi = torch.tensor([1 / 3, 1 / 3, 1 / 3])
    loss_fn = CLIPS4Loss(LossConfig(w_t=0, w_e=0, w_u=0, collapse_guard=0.5), Prototypes(C))
    loss_fn.set_teacher_prior(pi)
    assert torch.equal(loss_fn.guard_bias(), torch.zeros(3))  # the student starts at the teacher's shares
    seen = []
    for _ in range(200):
        bias = loss_fn.guard_bias()
        _, pseudo, _ = semantic_consistency_loss(v, i, valid, C, 10.0, bias=bias)
        seen.append(pseudo[:4].tolist())
        loss_fn._update_guard(v, valid)
    assert seen[0] == [1, 1, 1, 1] and seen[-1] == [0, 0, 0, 0]  # A's segments are labelled A again
    assert float(bias[0]) > 0 and float(bias[1]) == float(bias[2]) == 0.0
    assert pseudo[4:].tolist() == [1] * 4 + [2] * 4  # B's and class 2's segments keep their labels
    state = loss_fn.guard_state()
    again = CLIPS4Loss(LossConfig(w_t=0, w_e=0, w_u=0, collapse_guard=0.5), Prototypes(C))
    again.set_teacher_prior(pi)
    again.load_guard_state(state)  # a resumed run continues with the same bias
    assert torch.equal(again.guard_bias(), loss_fn.guard_bias())
    off = CLIPS4Loss(LossConfig(w_t=0, w_e=0, w_u=0), Prototypes(C))
    off.set_teacher_prior(pi)
    assert off.guard_bias() is None and LossConfig().collapse_guard == 0
