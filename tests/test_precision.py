"""bf16 mixed precision on the CPU: what stays fp32, the fallback, and that training still learns."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lit_spine import hardware
from lit_spine.bench import step
from lit_spine.losses import SpineLoss
from lit_spine.metrics import decode_heatmaps
from lit_spine.train_cli import run_lightning_cli

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_bf16_falls_back_to_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_bf16_native", lambda: False)
    precision, note = hardware.resolve_precision("bf16-mixed", "cpu")
    assert precision == "32-true"
    assert "bf16-mixed" in note and "AVX512-BF16" in note
    # A GPU run and an fp32 run are left as asked.
    assert hardware.resolve_precision("bf16-mixed", "gpu") == ("bf16-mixed", "")
    assert hardware.resolve_precision("32-true", "cpu") == ("32-true", "")
    monkeypatch.setattr(hardware, "cpu_bf16_native", lambda: True)
    assert hardware.resolve_precision("bf16-mixed", "cpu") == ("bf16-mixed", "")


def test_losses_norm_statistics_and_decoding_stay_fp32_under_cpu_autocast():
    module = step.build_module("resnet18", step.Variant("bf16-mixed", channels_last=True), "cpu")
    batch = step.make_batch(2, 64, torch.device("cpu"))
    conv_dtypes = []
    first_conv = next(m for m in module.net.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda m, i, o: conv_dtypes.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = module(batch["image"], batch["points"])
        losses = SpineLoss(class_loss="bce")(outputs, batch)
        points, scores = decode_heatmaps(outputs["heatmaps"], module.heatmap_stride)
    assert conv_dtypes == [torch.bfloat16]  # autocast really ran the convolutions in bf16
    for key in ("heatmaps", "vertebra_logits", "disc_logits"):
        assert outputs[key].dtype == torch.float32, key
    assert all(v.dtype == torch.float32 for v in losses.values()), losses
    assert points.dtype == torch.float32 and scores.dtype == torch.float32
    bn = next(m for m in module.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.running_mean.dtype == torch.float32 and bn.running_var.dtype == torch.float32
    assert torch.isfinite(bn.running_var).all()
    losses["loss"].backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in module.parameters())


@pytest.mark.skipif(not hardware.cpu_bf16_native(), reason="this CPU has no native bf16")
def test_tiny_bf16_trainer_run_on_cpu_lowers_the_loss(phantom_root, tmp_path):
    run_lightning_cli([
        "fit", "--config", str(EXPERIMENTS / "overfit.yaml"),
        f"--data.data_root={phantom_root}", "--data.train_split=train", "--data.val_split=train",
        "--data.image_size=64", f"--data.cache_dir={tmp_path / 'cache'}",
        "--trainer.precision=bf16-mixed", "--model.channels_last=true",
        "--trainer.max_epochs=12", "--trainer.log_every_n_steps=1",
        "--trainer.check_val_every_n_epoch=12", "--trainer.enable_progress_bar=false",
        f"--runs_root={tmp_path / 'runs'}", "--wandb=disabled",
    ])  # fmt: skip
    run = next((tmp_path / "runs" / "overfit").iterdir())
    config = (run / "config.yaml").read_text()
    assert "precision: bf16-mixed" in config
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 20
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, losses
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"


@pytest.mark.slow
@pytest.mark.skipif(not hardware.cpu_bf16_native(), reason="this CPU has no native bf16")
def test_overfit_preset_still_learns_in_bf16(tmp_path):
    """The overfit preset's own bar (tests/test_train.py), with the sweep preset's bf16 + channels_last."""
    run_lightning_cli([
        "fit", "--config", str(EXPERIMENTS / "overfit.yaml"),
        "--trainer.precision=bf16-mixed", "--model.channels_last=true",
        f"--data.phantom_dir={tmp_path / 'phantom'}", f"--data.cache_dir={tmp_path / 'cache'}",
        f"--runs_root={tmp_path / 'runs'}", "--wandb=disabled",
        "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    run = next((tmp_path / "runs" / "overfit").iterdir())
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert sum(losses[-3:]) / 3 < 0.05 * sum(losses[:3]) / 3, losses
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val/sdr/8mm"] > 0.9 and summary["val/mre_mm"] < 5.0, summary


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_adamw_is_fused_unless_a_grad_scaler_unscales_and_clipping_still_holds(precision):
    """Fused AdamW wherever no gradient scaler runs; there the module clips the gradients
    itself (Lightning's mixed-precision plugin refuses to for fused optimizers)."""
    import pytorch_lightning as pl
    from pytorch_lightning.plugins.precision import MixedPrecision

    from lit_spine.models.net import SpineNet
    from lit_spine.module import SpineModule

    module = SpineModule(SpineNet("test_resnet", head_channels=16), scheduler="constant")
    if precision == "16-mixed":  # fp16 AMP with its scaler (what a GPU run gets)
        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
        module.trainer = pl.Trainer(accelerator="cpu", plugins=[plugin], logger=False)
    else:
        module.trainer = pl.Trainer(accelerator="cpu", precision=precision, logger=False)
    optimizer = module.configure_optimizers()
    fused = precision != "16-mixed"
    assert optimizer.defaults["fused"] is fused
    if not fused:
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for algorithm, clip in (("norm", 0.5), ("value", 0.01)):
        for i, p in enumerate(params):
            p.grad = torch.full_like(p, float(i % 7) - 3.0)
        module.configure_gradient_clipping(optimizer, clip, algorithm)
        grads = torch.cat([p.grad.flatten() for p in params])
        if algorithm == "norm":
            assert grads.norm().item() == pytest.approx(clip, rel=1e-4)
        else:
            assert grads.abs().max().item() == pytest.approx(clip)
