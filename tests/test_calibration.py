"""Class calibration (clips4.trainer.calibration): a collapsed class gets its best-ranked pixels back."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clips4.trainer.inference import similarity_logits
from clips4.trainer.calibration import (calibrate, class_frequencies, fit_prior_bias, median_margin, prior_bias,
                                       stored_bias)


def _collapsed(n_a=400, n_b=600, seed=0):
    """Scores of a student that answers B everywhere but still ranks A's pixels higher for A than B's."""
    g = torch.Generator().manual_seed(seed)
    a = torch.stack([0.42 + 0.01 * torch.randn(n_a, generator=g), 0.50 + 0.01 * torch.randn(n_a, generator=g)], 1)
    b = torch.stack([0.30 + 0.01 * torch.randn(n_b, generator=g), 0.60 + 0.01 * torch.randn(n_b, generator=g)], 1)
    return torch.cat([a, b]), torch.cat([torch.zeros(n_a, dtype=torch.long), torch.ones(n_b, dtype=torch.long)])


def test_bias_restores_a_collapsed_class_and_matches_the_target_frequencies():
    scores, truth = _collapsed()
    assert (scores.argmax(1) == 0).sum() == 0  # collapsed: A is never predicted
    bias = fit_prior_bias(scores, torch.tensor([0.4, 0.6]))
    pred = (scores + bias).argmax(1)
    freq = class_frequencies(pred, 2)
    assert abs(float(freq[0]) - 0.4) < 0.02 and abs(float(bias.sum())) < 1e-5
    assert float((pred == truth).float().mean()) > 0.95


def test_matching_frequencies_already_right_changes_nothing():
    scores, truth = _collapsed()
    scores[:400, 0] += 0.2  # now A wins on its own pixels: frequencies already 0.4 / 0.6
    assert torch.equal((scores + fit_prior_bias(scores, torch.tensor([0.4, 0.6]))).argmax(1), scores.argmax(1))


def test_prior_bias_counts_teacher_and_student_on_the_student_grid():
    rng = np.random.default_rng(0)
    text = np.eye(3, 8, dtype=np.float32)
    student = np.zeros((4, 4, 8), np.float32)
    student[..., 1] = 1.0  # the student says class 1 everywhere
    student[:2, :, 0] = 0.9  # ... but its top half leans to class 0
    teacher = np.zeros((2, 2, 8), np.float32)  # coarser grid: top half class 0, bottom half class 1
    teacher[0, :, 0] = 1.0
    teacher[1, :, 1] = 1.0
    teacher += 0.01 * rng.standard_normal(teacher.shape).astype(np.float32)
    out = prior_bias([0, 1], lambda r: similarity_logits(student, text, layout="hwd"),
                     lambda r, hw: similarity_logits(teacher, text, hw, layout="hwd"))
    assert out["n_images"] == 2 and out["student_freq"][1] == 1.0
    assert abs(out["teacher_freq"][0] - 0.5) < 0.1 and abs(out["matched_freq"][0] - out["teacher_freq"][0]) < 0.1


def _over_predicts_class_2():
    """(1000, 3) scores of a student predicting class 2 at 0.45 and class 1 at 0.25 against targets 0.3 / 0.4 / 0.3
    (class 1 at 0.62 of its target), and those targets."""
    g = torch.Generator().manual_seed(1)
    cls = torch.cat([torch.zeros(300), torch.ones(250), torch.full((450,), 2)]).long()
    return torch.nn.functional.one_hot(cls, 3).float() + 0.05 * torch.randn(1000, 3, generator=g), torch.tensor([0.3, 0.4, 0.3])


def test_collapse_guard_raises_only_a_collapsed_class_and_lowers_none():
    """mode=raise: A (collapsed into B) is raised to its target; a student already near the teacher's
    frequencies, or one over-predicting a class it has not collapsed, is left exactly as it is."""
    scores, truth = _collapsed()
    bias = fit_prior_bias(scores, torch.tensor([0.4, 0.6]), mode="raise")
    assert float(bias[0]) > 0 and float(bias[1]) == 0.0
    pred = (scores + bias).argmax(1)
    assert abs(float(class_frequencies(pred, 2)[0]) - 0.4) < 0.02
    assert float((pred == truth).float().mean()) > 0.95
    # three classes, the student over-predicts class 2 (0.45 vs 0.3) at the expense of class 1 (0.25 vs 0.4):
    # not collapsed at a trigger of 0.5 (0.62 of its target), so nothing moves; match mode would move both
    s3, target = _over_predicts_class_2()
    assert torch.equal(fit_prior_bias(s3, target, mode="raise", collapse_ratio=0.5), torch.zeros(3))
    assert fit_prior_bias(s3, target).abs().sum() > 0
    # a student within 0.85 of every target is left exactly as it is at the default trigger
    g = torch.Generator().manual_seed(2)
    near = torch.cat([torch.zeros(290), torch.ones(370), torch.full((340,), 2)]).long()
    s_near = torch.nn.functional.one_hot(near, 3).float() + 0.05 * torch.randn(1000, 3, generator=g)
    assert torch.equal(fit_prior_bias(s_near, target, mode="raise"), torch.zeros(3))
    with pytest.raises(ValueError, match="match, raise or band"):
        fit_prior_bias(s3, target, mode="lower")


def test_band_also_lowers_the_class_that_took_the_collapsed_ones_pixels():
    """mode=band: class 1 (0.62 of its target) is raised, class 2 (1.5 x its target) lowered, class 0 (at its
    target) keeps 0; both move towards their targets. A student within the band is left exactly as it is."""
    s3, target = _over_predicts_class_2()
    b = fit_prior_bias(s3, target, mode="band")
    assert float(b[1]) > 0 and float(b[2]) < 0 and float(b[0]) == 0.0
    f = class_frequencies((s3 + b).argmax(1), 3)
    assert abs(float(f[1]) - 0.4) < 0.03 and abs(float(f[2]) - 0.3) < 0.03
    assert torch.equal(fit_prior_bias(s3, target, mode="band", collapse_ratio=0.5), torch.zeros(3))
    capped = fit_prior_bias(s3, target, mode="band", max_bias=0.01)
    assert float(capped.abs().max()) <= 0.01 + 1e-7


def test_collapse_ratio_sets_the_guards_trigger():
    """Class 1 is predicted at 0.62 of its target: left alone at a trigger of 0.5, raised (and only it) at the
    default 0.85; the trigger must lie in (0, 1]."""
    s3, target = _over_predicts_class_2()
    assert torch.equal(fit_prior_bias(s3, target, mode="raise", collapse_ratio=0.5), torch.zeros(3))
    b = fit_prior_bias(s3, target, mode="raise")
    assert float(b[1]) > 0 and float(b[0]) == 0.0 and float(b[2]) == 0.0
    assert float(class_frequencies((s3 + b).argmax(1), 3)[1]) > 0.3
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="collapse ratio"):
            fit_prior_bias(s3, target, mode="raise", collapse_ratio=bad)


def _unranked_class_2(n=1200, seed=3):
    """(n, 3) scores: classes 0 and 1 compete with small margins, class 2 is ranked last everywhere by 0.5."""
    g = torch.Generator().manual_seed(seed)
    s = 0.5 + 0.01 * torch.randn(n, 3, generator=g)
    s[:, 2] -= 0.5
    return s


def test_collapse_guard_caps_a_raise_at_the_networks_own_margin():
    """A class the student ranks last everywhere is no threshold error: raising it to its target would need a bias
    ~25x the network's median top-1/top-2 margin and would paint it on pixels chosen by noise. The raise stops at
    ``max_margins`` median margins and the class is reported as capped; without a cap it takes its share."""
    scores = _unranked_class_2()
    target = torch.tensor([0.3, 0.3, 0.4])
    teacher = torch.nn.functional.one_hot(torch.repeat_interleave(torch.arange(3), torch.tensor([360, 360, 480])), 3)
    teacher = teacher.t().float().reshape(3, 40, 30)  # the teacher's shares: the target 0.3 / 0.3 / 0.4
    out = prior_bias([0], lambda r: scores.t().reshape(3, 40, 30), lambda r, hw: teacher, mode="raise")
    assert out["teacher_freq"][2] == pytest.approx(0.4)
    margin = median_margin(scores)
    assert 0 < margin < 0.03 and out["max_bias"] == pytest.approx(2.0 * margin)
    assert out["capped"] == [2] and out["bias"][2] == pytest.approx(out["max_bias"]) and out["matched_freq"][2] < 0.05
    free = fit_prior_bias(scores, target, mode="raise", max_bias=None)
    assert float(free[2]) > 0.4 and float(class_frequencies((scores + free).argmax(1), 3)[2]) > 0.3
    # a class that needs less than the cap is raised as before and not reported
    s, _ = _collapsed()
    out = prior_bias([0], lambda r: s.t().reshape(2, 40, 25),
                     lambda r, hw: torch.stack([(torch.arange(1000) < 400).float(), (torch.arange(1000) >= 400).float()]
                                               ).reshape(2, *hw), mode="raise")
    assert out["capped"] == [] and out["bias"][0] > 0 and out["matched_freq"][0] > 0.3
    # match mode is every class's explicit choice: no cap
    assert prior_bias([0], lambda r: s.t().reshape(2, 40, 25), lambda r, hw: torch.ones(2, *hw))["max_bias"] is None


def test_calibrate_and_stored_bias_follow_the_class_names_and_texts():
    """calibrate() raises the class a student under-predicts (its record is what final.pt stores); stored_bias()
    hands back the entries of the evaluated classes (a subset in another order is fine) and refuses, saying why,
    a class it was not fitted on or a different text embedding of the same name."""
    text = np.eye(3, 8, dtype=np.float32)
    student = np.zeros((6, 6, 8), np.float32)
    student[..., 1] = 1.0
    student[:2, :, 0] = 0.9  # class 0 ranked second on its own (top) rows: collapsed into class 1
    student[4:, :, 2] = 2.0
    teacher = np.zeros((3, 3, 8), np.float32)
    teacher[0, :, 0], teacher[1, :, 1], teacher[2, :, 2] = 1.0, 1.0, 1.0
    cal = calibrate(lambda r: student, list(range(5)), lambda r: teacher, ["a", "b", "c"], text, max_images=3)
    assert cal["n_images"] == 3 and cal["classes"] == ["a", "b", "c"] and cal["mode"] == "raise"
    assert cal["bias"][0] > 0 and cal["bias"][1] == 0 and cal["bias"][2] == 0
    assert cal["matched_freq"][0] > cal["student_freq"][0] == 0
    bias, why = stored_bias(cal, ["c", "a"], text[[2, 0]])
    assert why == "" and bias.tolist() == pytest.approx([cal["bias"][2], cal["bias"][0]])
    assert stored_bias(cal, ["a", "d"], text[:2])[0] is None and "'d'" in stored_bias(cal, ["a", "d"], text[:2])[1]
    other = text[[1, 0, 2]]  # same names, other texts (another CLIP)
    bias, why = stored_bias(cal, ["a", "b", "c"], other)
    assert bias is None and "texts differ" in why
    assert stored_bias(None, ["a"], text[:1])[0] is None


def test_segment_pooled_averages_the_teachers_noise_over_each_segment():
    """segment_pooled(): every cell takes its segment's mean embedding, so a noise patch inside a segment no longer
    counts as another class in the teacher's frequencies; cells of no segment (label -1) keep their own."""
    from clips4.trainer.calibration import segment_pooled

    feats = np.zeros((4, 4, 3), np.float32)
    feats[..., 0] = 1.0
    feats[0, 0] = [0.0, 1.0, 0.0]  # one noisy cell in the left segment
    feats[:, 2:] = [0.0, 0.0, 1.0]
    labels = np.repeat(np.repeat(np.array([[0, 1], [0, -1]]), 8, 0), 8, 1)  # (16, 16): left, top right, no segment
    out = segment_pooled(feats, labels)
    assert out.shape == feats.shape and np.argmax(out[0, 0]) == 0  # the noisy cell now reads its segment's class
    assert np.allclose(np.linalg.norm(out[:, :2], axis=-1), 1.0, atol=1e-5)
    assert np.array_equal(out[2:, 2:], feats[2:, 2:])  # no segment: unchanged
    assert np.array_equal(segment_pooled(feats, None), feats)


def test_match_never_ends_further_from_the_target_than_no_bias():
    """A student that ranks one class first on every pixel by the same margin: any bias hands all pixels from class
    to class, so the updates oscillate; the fit returns the iterate nearest the target, no bias included."""
    from clips4.trainer.calibration import class_frequencies, fit_prior_bias

    scores = torch.zeros(600, 4)
    scores[:, 1] = 0.05
    target = torch.tensor([0.1, 0.5, 0.2, 0.2])  # no bias is the best there is: any flip is further
    gap = lambda b: float((class_frequencies((scores + b).argmax(1), 4) - target).abs().sum())  # noqa: E731
    for iters in (100, 200, 300):  # wherever the oscillation stands when the updates stop
        assert gap(fit_prior_bias(scores, target, mode="match", iters=iters)) <= gap(torch.zeros(4)) + 1e-9, iters


def _unrecognised_class(seed=0):
    """Scores of a student that recognises classes 0 and 1 (right on their pixels) but not class 2: it reads class
    2's pixels as 0 or 1 and ranks 2 last there, while on 0's and 1's pixels 2 is a close second. The teacher labels
    every pixel right, so class 2 is under-predicted and a raise fills it with 0's and 1's pixels."""
    g = torch.Generator().manual_seed(seed)
    n = 300
    truth = torch.cat([torch.zeros(n), torch.ones(n), torch.full((n,), 2)]).long()
    s = 0.02 * torch.randn(3 * n, 3, generator=g)
    s[:n, 0] += 0.6
    s[:n, 2] += 0.55  # 2 a close second on 0's pixels
    s[n:2 * n, 1] += 0.6
    s[n:2 * n, 2] += 0.55
    s[2 * n:2 * n + n // 2, 0] += 0.6  # its own pixels read as 0 or 1, 2 ranked last
    s[2 * n + n // 2:, 1] += 0.6
    s[2 * n:, 2] += 0.4
    return s, truth


def test_guard_keeps_no_raise_that_takes_other_classes_pixels():
    scores, truth = _unrecognised_class()
    target = class_frequencies(truth, 3)
    pred0 = scores.argmax(1)
    full = fit_prior_bias(scores, target, mode="band", max_bias=1.0)
    assert float(full[2]) > 0  # the frequencies ask for class 2 to be raised
    hurt = (scores + full).argmax(1)
    assert float((hurt[:600] == truth[:600]).float().mean()) < float((pred0[:600] == truth[:600]).float().mean()) - 0.2
    student = [scores.t().reshape(3, 30, 30)]
    teacher = [torch.nn.functional.one_hot(truth, 3).float().t().reshape(3, 30, 30)]
    out = prior_bias([0], lambda r: student[r], lambda r, hw: teacher[r], mode="band", max_margins=None)
    assert out["scale"] < 1 and out["agreement"]["0.0"] > out["agreement"]["1.0"]
    kept = (scores + torch.as_tensor(out["bias"])).argmax(1)
    assert float((kept == truth).float().mean()) >= float((pred0 == truth).float().mean())
    off = prior_bias([0], lambda r: student[r], lambda r, hw: teacher[r], mode="band", max_margins=None, guard=False)
    assert off["scale"] == 1.0 and np.allclose(off["bias"], full.numpy(), atol=1e-6)


def test_guard_keeps_the_whole_raise_that_gives_a_collapsed_class_its_pixels_back():
    scores, truth = _collapsed()
    student = [scores.t().reshape(2, 40, 25)]
    teacher = [torch.nn.functional.one_hot(truth, 2).float().t().reshape(2, 40, 25)]
    out = prior_bias([0], lambda r: student[r], lambda r, hw: teacher[r], mode="band", max_margins=None)
    assert out["scale"] == 1.0 and out["bias"][0] > 0
    assert out["agreement"]["1.0"] > out["agreement"]["0.0"] + 0.3
