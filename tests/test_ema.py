"""``train.ema``: an exponential moving average of the student's weights (parameters and buffers), evaluated in
``final.pt``. Off (0, the default) leaves every checkpoint as before; on, the average equals the hand-computed one
and a resumed run continues it exactly."""
from __future__ import annotations

import pytest
import torch
from test_train import load_cfg, tiny_world

from clips4.trainer.checkpoint import load_checkpoint
from clips4.trainer.config import TrainParams
from clips4.trainer.ema import WeightEMA, ema_decay
from clips4.trainer.loading import load_trained_model
from clips4.trainer.train import train


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory)


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.bn = torch.nn.BatchNorm1d(2)  # float buffers (running stats) + an integer one (num_batches_tracked)


def test_ema_is_the_hand_computed_average_of_parameters_and_buffers():
    m = _Tiny()
    with torch.no_grad():
        m.w.copy_(torch.tensor([1.0, -2.0]))
        m.bn.running_mean.fill_(4.0)
    ema = WeightEMA(m, decay=0.5)
    e_w, e_mean = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 4.0])
    for t, (w, mean) in enumerate([(3.0, 0.0), (-1.0, 2.0), (5.0, 6.0), (2.0, -4.0)]):
        with torch.no_grad():
            m.w.fill_(w)
            m.bn.running_mean.fill_(mean)
            m.bn.num_batches_tracked.fill_(t + 1)
        ema.update(m)
        d = min(0.5, (1 + t) / (10 + t))  # warm-up: 0.1, 2/11, 3/12, then 0.5
        assert d == ema_decay(0.5, t)
        e_w, e_mean = d * e_w + (1 - d) * w, d * e_mean + (1 - d) * mean
        torch.testing.assert_close(ema.weights["w"], e_w, rtol=0, atol=1e-6)
        torch.testing.assert_close(ema.weights["bn.running_mean"], e_mean, rtol=0, atol=1e-6)
        assert int(ema.weights["bn.num_batches_tracked"]) == t + 1  # integers copied, not averaged
    assert ema.updates == 4
    again = WeightEMA(_Tiny(), decay=0.5)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 4 and torch.equal(again.weights["w"], ema.weights["w"])
    assert TrainParams().ema == 0


def test_ema_off_unchanged_on_evaluated_in_final_and_resumed_exactly(world, tmp_path):
    off = train(load_cfg(world, tmp_path / "off"), show_progress=False)
    assert off.stopped == "finished"
    ck_off, last_off = load_checkpoint(tmp_path / "off" / "final.pt"), load_checkpoint(tmp_path / "off" / "last.pt")
    assert "ema" not in ck_off and "model_raw" not in ck_off  # off: final.pt is the last iterate, as before
    for k, v in ck_off["model"].items():
        assert torch.equal(v, last_off["model"][k]), k

    sets = ("train.ema=0.5",)
    full = train(load_cfg(world, tmp_path / "full", *sets), show_progress=False)
    ck = load_checkpoint(tmp_path / "full" / "final.pt")
    assert ck["ema"]["updates"] == full.step == 6
    # the raw weights are those of the same run without the average (the EMA does not touch training)
    assert [r["total"] for r in full.losses] == [r["total"] for r in off.losses]
    for k, v in ck["model_raw"].items():
        assert torch.equal(v, ck_off["model"][k]), k
    differs = [k for k, v in ck["model"].items() if v.is_floating_point() and not torch.equal(v, ck["model_raw"][k])]
    assert differs, "the evaluated weights are the average, not the last iterate"
    model, _ = load_trained_model(tmp_path / "full" / "final.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck["ema"]["weights"][k]), k

    part = train(load_cfg(world, tmp_path / "part", *sets), max_steps=4, show_progress=False)
    assert part.stopped == "max_steps" and load_checkpoint(tmp_path / "part" / "last.pt")["ema"]["updates"] == 4
    rest = train(load_cfg(world, tmp_path / "part", *sets), resume=True, show_progress=False)
    assert rest.stopped == "finished"
    ck_part = load_checkpoint(tmp_path / "part" / "final.pt")
    assert ck_part["ema"]["updates"] == 6
    for k, v in ck["model"].items():
        assert torch.equal(v, ck_part["model"][k]), k
