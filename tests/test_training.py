"""training.train and eps_schedule on the paper's toy data: each mode lowers its own objective, the warm-up
schedule, CSV logs, checkpoints, and resuming after an interruption exactly as if there had been none."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import polytope_lab as pl
from polytope_lab import attacks, data, models, training

EPS = 0.03
FAST = dict(eps=EPS, batch_size=10, lr=2e-2, attack_steps=5, progress=False)


@pytest.fixture(scope="module")
def toy():
    return data.toy_points(n=20, seed=0)


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return models.mlp([2, 32, 32, 2])


def objectives(model, X, y):
    """(clean cross-entropy, cross-entropy on PGD points, robust loss) at EPS."""
    with torch.no_grad():
        clean = F.cross_entropy(model(X), y).item()
    x_adv, _ = attacks.pgd(model, X, y, EPS, steps=10, seed=0)
    with torch.no_grad():
        adversarial = F.cross_entropy(model(x_adv), y).item()
    with torch.no_grad():
        robust = training.robust_loss(model, EPS, X, y)[0].item()
    return clean, adversarial, robust


@pytest.mark.parametrize("mode, which", [("standard", 0), ("pgd", 1), ("robust", 2)])
def test_each_mode_lowers_its_objective(toy, mode, which):
    X, y = toy
    model = small_mlp()
    before = objectives(model, X, y)
    log = training.train(model, X, y, mode=mode, epochs=30, warmup_epochs=3, **FAST)
    after = objectives(model, X, y)
    assert not model.training
    assert after[which] < before[which] - 0.05, (before, after)
    # the logged objective falls after the warm-up, at full ε
    column = "robust_loss" if mode == "robust" else "loss"
    assert log[column].iloc[-1] < log[column].iloc[2] - 0.05
    if mode == "robust":
        assert log["robust_loss"].ge(log["loss"] - 1e-6).all()          # the robust loss bounds the clean one
        assert log["robust_error"].ge(log["error"]).all()
    else:
        assert log[["robust_loss", "robust_error"]].isna().all().all()


def test_eps_schedule_values():
    assert training.eps_schedule(0.1, 0, 0, 0.0) == 0.1
    assert [training.eps_schedule(0.1, 2, e, f) for e, f in [(0, 0.0), (0, 0.5), (0, 1.0), (1, 0.5), (1, 1.0)]] \
        == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    assert training.eps_schedule(0.1, 2, 7, 0.3) == 0.1
    with pytest.raises(ValueError, match="fraction"):
        training.eps_schedule(0.1, 2, 0, 1.5)
    with pytest.raises(ValueError, match="epoch"):
        training.eps_schedule(0.1, 2, -1, 0.5)


def test_warmup_ramps_eps_per_batch(toy, monkeypatch):
    """robust_loss sees ε rising batch by batch over the warm-up epochs, then the full ε; the log shows the ε
    at each epoch's end."""
    X, y = toy
    seen = []
    real = training.robust_loss
    monkeypatch.setattr(training, "robust_loss",
                        lambda model, eps, *a, **k: seen.append(eps) or real(model, eps, *a, **k))
    log = training.train(small_mlp(), X, y, mode="robust", epochs=3, warmup_epochs=2, **FAST)  # 2 batches/epoch
    assert seen == pytest.approx([EPS * k / 4 for k in (1, 2, 3, 4)] + [EPS, EPS])
    assert log["eps"].tolist() == pytest.approx([EPS / 2, EPS, EPS])
    assert log["epoch"].tolist() == [1, 2, 3]


def test_log_columns_and_csv(toy, tmp_path):
    X, y = toy
    path = tmp_path / "logs" / "train.csv"
    path.parent.mkdir()
    path.write_text("stale contents of an earlier run\n")
    log = training.train(small_mlp(), X, y, mode="pgd", epochs=3, log_path=path, **FAST)
    assert list(log.columns) == ["epoch", "eps", "loss", "error", "robust_loss", "robust_error", "seconds"]
    csv = pd.read_csv(path)
    assert list(csv.columns) == list(log.columns)
    pd.testing.assert_frame_equal(csv, log, check_exact=False, rtol=1e-12)
    assert (log["seconds"] > 0).all() and log["error"].between(0, 1).all()


class Interrupt(Exception):
    """Stands in for KeyboardInterrupt / a killed job."""


def interrupt_after(model, batches):
    """A forward hook that raises on the training forward pass number ``batches + 1``."""
    count = [0]

    def hook(module, inputs, output):
        if module.training:
            count[0] += 1
            if count[0] > batches:
                raise Interrupt

    return model.register_forward_hook(hook)


@pytest.mark.parametrize("mode", ["pgd", "robust"])
def test_resume_after_interruption_matches_an_uninterrupted_run(toy, tmp_path, mode):
    X, y = toy
    settings = dict(mode=mode, epochs=4, warmup_epochs=2, architecture={"name": "mlp", "sizes": [2, 32, 32, 2]},
                    **FAST)
    reference = small_mlp()
    log_ref = training.train(reference, X, y, checkpoint_dir=tmp_path / "ref", **settings)

    model = small_mlp()
    handle = interrupt_after(model, 2 * 2 + 1)                         # 2 batches per epoch: dies in epoch 3
    with pytest.raises(Interrupt):
        training.train(model, X, y, checkpoint_dir=tmp_path / "run", log_path=tmp_path / "run.csv", **settings)
    handle.remove()
    assert not model.training
    assert len(pd.read_csv(tmp_path / "run.csv")) == 2
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text())["epoch"] == 2

    resumed = small_mlp(seed=1)                                        # other weights: they must come from disk
    log = training.train(resumed, X, y, checkpoint_dir=tmp_path / "run", log_path=tmp_path / "run.csv", **settings)
    assert log["epoch"].tolist() == [1, 2, 3, 4]
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    columns = ["epoch", "eps", "loss", "error", "robust_loss", "robust_error"]
    pd.testing.assert_frame_equal(log[columns], log_ref[columns], check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "run.csv")[columns], log_ref[columns], check_exact=False,
                                  rtol=1e-12)


def test_checkpoint_contents_and_round_trip(toy, tmp_path):
    X, y = toy
    arch = {"name": "mlp", "sizes": [2, 32, 32, 2]}
    model = small_mlp()
    log = training.train(model, X, y, mode="standard", epochs=2, checkpoint_dir=tmp_path, architecture=arch, **FAST)
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["architecture"] == arch and meta["epoch"] == 2
    assert meta["settings"]["mode"] == "standard" and meta["settings"]["eps"] == EPS
    assert [row["epoch"] for row in meta["log"]] == [1, 2] and meta["log"][0]["robust_loss"] is None
    loaded = models.load_state(models.mlp(meta["architecture"]["sizes"]), tmp_path / "checkpoint.pt")
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    # asking for no more epochs than the checkpoint holds restores it without training
    again = small_mlp(seed=3)
    log2 = training.train(again, X, y, mode="standard", epochs=2, checkpoint_dir=tmp_path, **FAST)
    assert torch.equal(again[0].weight, model[0].weight)
    pd.testing.assert_frame_equal(log2, log)


def test_resume_refuses_other_settings_data_or_fewer_epochs(toy, tmp_path):
    X, y = toy
    training.train(small_mlp(), X, y, mode="standard", epochs=2, checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(ValueError, match="lr"):
        training.train(small_mlp(), X, y, mode="standard", epochs=3, checkpoint_dir=tmp_path, **{**FAST, "lr": 0.1})
    with pytest.raises(ValueError, match="data"):
        training.train(small_mlp(), X, 1 - y, mode="standard", epochs=3, checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(ValueError, match="epoch 2"):
        training.train(small_mlp(), X, y, mode="standard", epochs=1, checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(ValueError, match="does not fit"):
        training.train(models.mlp([2, 8, 2]), X, y, mode="standard", epochs=3, checkpoint_dir=tmp_path, **FAST)
    log = training.train(small_mlp(), X, y, mode="standard", epochs=1, checkpoint_dir=tmp_path, resume=False, **FAST)
    assert log["epoch"].tolist() == [1]
    assert json.loads((tmp_path / "checkpoint.json").read_text())["epoch"] == 1


def test_same_seed_same_result_and_progress_bar(toy, capsys):
    X, y = toy
    a, b = small_mlp(), small_mlp()
    training.train(a, X, y, mode="pgd", epochs=2, **FAST)
    training.train(b, X, y, mode="pgd", epochs=2, **{**FAST, "progress": True}, device="cpu")
    assert torch.equal(a[0].weight, b[0].weight)
    assert "train (pgd)" in capsys.readouterr().err
    c = small_mlp()
    training.train(c, X, y, mode="pgd", epochs=2, seed=1, **FAST)
    assert not torch.equal(a[0].weight, c[0].weight)                  # the seed drives shuffling and attacks


@pytest.mark.parametrize("change, match", [
    (dict(mode="madry"), "mode"),
    (dict(eps=-0.1), "eps"),
    (dict(eps=math.nan), "eps"),
    (dict(epochs=0), "epochs"),
    (dict(batch_size=2.5), "batch_size"),
    (dict(lr=0), "lr"),
    (dict(attack_step_size=-1.0), "attack_step_size"),
    (dict(clip=0.5), "clip"),
    (dict(clip=(1.0, 0.0)), "clip"),
    (dict(clip=(0.0, 0.5)), "outside clip"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=2.0), "chunk_size"),
])
def test_bad_settings_rejected(toy, change, match):
    X, y = toy
    with pytest.raises(ValueError, match=match):
        training.train(small_mlp(), X, y, **{**FAST, "epochs": 1, **change})


def test_numpy_and_tensor_settings_accepted(toy):
    X, y = toy
    log = training.train(small_mlp(), X.numpy(), y.numpy(), mode="robust", eps=torch.tensor(EPS), lr=np.float32(0.01),
                         epochs=np.int64(1), batch_size=np.int64(10), clip=(0, 1), progress=False)
    assert log["eps"].tolist() == pytest.approx([EPS]) and log["robust_loss"].notna().all()


def test_bad_data_rejected(toy):
    X, y = toy
    bad_X = X.clone()
    bad_X[3, 1] = float("nan")
    cases = [
        (bad_X, y, "NaN"),
        (X, y[:-1], "shape"),
        (X[0], y, "batch"),
        (X, y.float(), "integer"),
        (X, y + 1, r"labels must lie in \[0, 2\)"),
        (torch.rand(20, 3), y, "inputs of shape"),
    ]
    for X_, y_, match in cases:
        with pytest.raises(ValueError, match=match):
            training.train(small_mlp(), X_, y_, **{**FAST, "epochs": 1})


def test_exports():
    assert pl.train is training.train and pl.robust_loss is training.robust_loss
    assert training.eps_schedule and data.toy_points


def test_chunked_robust_training_takes_the_same_steps(toy):
    """``chunk_size`` accumulates the batch's gradient over chunks: the same weights and log as one pass
    (float64, so only rounding differs); with projections the run is still reproducible."""
    X, y = toy
    X = X.double()
    models_ = []
    for chunk_size in (None, 3, 10):
        model = small_mlp().double()
        log = training.train(model, X, y, mode="robust", epochs=3, chunk_size=chunk_size, **FAST)
        models_.append((model, log))
    (ref, ref_log), *others = models_
    for model, log in others:
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.allclose(p, q, atol=1e-10, rtol=0)
        assert np.allclose(log.drop(columns="seconds"), ref_log.drop(columns="seconds"), atol=1e-10)
    runs = []
    for _ in range(2):
        model = small_mlp().double()
        runs.append(training.train(model, X, y, mode="robust", epochs=2, chunk_size=4, proj=1, **FAST))
    assert runs[0].drop(columns="seconds").equals(runs[1].drop(columns="seconds"))
