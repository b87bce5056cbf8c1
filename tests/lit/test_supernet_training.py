"""Training a supernet: the sandwich rule, in-place distillation, BN recalibration."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from fvlab.data import SyntheticDataModule
from fvlab.lit import SupernetClassifier
from fvlab.models import recalibrate_batchnorm

pytestmark = pytest.mark.filterwarnings("ignore")

HAT2 = [False, False, True, False]
# fastervit_micro at 32 px: stage 2 is 2x2 tokens, so window_size 1 there gives four windows with
# carrier tokens, window_size 2 one window without.
SPACE = {"depths": [[1, 1, 1, 1], [1, 1, 2, 1]], "window_size": [[2, 2, 1, 1], [2, 2, 2, 1]],
         "ct_size": [1], "hat": [False, HAT2], "do_propagation": [False, True]}


def module(**kwargs) -> SupernetClassifier:
    torch.manual_seed(0)
    settings = dict(space=SPACE, sandwich=2, distill=True, arch={"name": "fastervit_micro"}, num_classes=4,
                    image_size=32, lr=3e-3, scheduler="none", label_smoothing=0.0)
    return SupernetClassifier(**{**settings, **kwargs})


class Recording(SupernetClassifier):
    """Keeps the subnets of every training step (as the module chose them)."""

    def sandwich_subnets(self, batch_idx: int) -> list[dict]:
        chosen = super().sandwich_subnets(batch_idx)
        self.__dict__.setdefault("steps", []).append(chosen)
        return chosen


def fit_briefly(lit: SupernetClassifier, tmp_path, steps: int) -> pl.Trainer:
    """A real Trainer fit of ``steps`` steps on 32 synthetic images, one validation batch."""
    data = SyntheticDataModule(image_size=32, num_classes=4, num_samples=32, val_samples=16, batch_size=16)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(lit, datamodule=data)
    return trainer


def test_sandwich_training_with_a_real_trainer(tmp_path) -> None:
    torch.manual_seed(0)
    lit = Recording(space=SPACE, sandwich=2, distill=True, arch={"name": "fastervit_micro"}, num_classes=4,
                    image_size=32, lr=3e-3, scheduler="none")
    before = copy.deepcopy(lit.model.state_dict())
    trainer = fit_briefly(lit, tmp_path, steps=2)

    largest, smallest = lit.extreme_subnets()
    assert largest == {"depths": [1, 1, 2, 1], "window_size": [2, 2, 1, 1], "ct_size": 1, "hat": HAT2,
                       "do_propagation": True}
    assert smallest["depths"] == [1, 1, 1, 1] and smallest["hat"] is False
    assert len(lit.steps) == 2
    for chosen in lit.steps:
        assert chosen[:2] == [largest, smallest] and len(chosen) == 4
        assert all(c[k] in SPACE[k] for c in chosen[2:] for k in SPACE)
    assert lit.steps[0][2:] != lit.steps[1][2:]  # fresh random subnets each step
    assert {"train/loss", "train/loss_largest", "train/loss_smallest", "val/acc1"} <= set(trainer.callback_metrics)
    after = lit.model.state_dict()
    # The largest subnet trains the deepest block and the carrier-token weights.
    for key in ("levels.2.blocks.1.attn.qkv.weight", "levels.2.blocks.1.hat_attn.qkv.weight",
                "levels.2.global_tokenizer.pos_embed.weight", "levels.0.blocks.0.conv1.weight"):
        assert not torch.equal(before[key], after[key]), key
    assert lit.model.active_subnet == largest  # what validation ran


@pytest.mark.parametrize("distill", [True, False])
def test_smaller_subnets_learn_the_largest_soft_labels(distill: bool) -> None:
    lit = module(distill=distill).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    largest, smallest = lit.extreme_subnets()
    losses = lit.sandwich_losses(x, y, [largest, smallest])
    # Recomputed independently (training-mode BN uses batch statistics, so the outputs repeat).
    with lit.model.subnet(largest):
        teacher = lit.model(x)
    with lit.model.subnet(smallest):
        student = lit.model(x)
    assert torch.allclose(losses[0], F.cross_entropy(teacher, y), atol=1e-6)
    expected = (-(teacher.softmax(-1) * student.log_softmax(-1)).sum(-1).mean() if distill
                else F.cross_entropy(student, y))
    assert torch.allclose(losses[1], expected, atol=1e-6)
    losses[1].backward()
    # The teacher's soft labels are constants: only the student's path carries gradient.
    assert lit.model.levels[2].blocks[1].attn.qkv.weight.grad.abs().sum() == 0


def test_recalibration_sets_running_statistics_to_the_average_over_the_batches() -> None:
    lit = module()
    net = lit.model.train()
    batches = [torch.randn(4, 3, 32, 32) + i for i in range(3)]
    seen = []
    bn = net.patch_embed.conv_down[1]
    hook = bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].mean((0, 2, 3))))
    try:
        assert recalibrate_batchnorm(net, [(b, None) for b in batches]) == 3
    finally:
        hook.remove()
    assert torch.allclose(bn.running_mean, torch.stack(seen).mean(0), atol=1e-5)
    assert bn.momentum == 0.1 and bn.num_batches_tracked == 3 and net.training
    # Eval logits now use these statistics, not those of training.
    net.eval()
    with torch.no_grad():
        calibrated = net(batches[0])
        recalibrate_batchnorm(net, batches[:1])
        assert not torch.allclose(calibrated, net(batches[0]))


def test_settings_a_supernet_cannot_train_with_are_refused() -> None:
    with pytest.raises(ValueError, match="model.ema"):
        module(ema=True)
    with pytest.raises(ValueError, match="a Swin"):
        module(arch={"name": "hat_swin_tiny_patch4_window7_224"})
    with pytest.raises(ValueError, match="sandwich"):
        module(sandwich=-1)


WIDTH_SPACE = {**SPACE, "dim": [8, 16], "mlp_ratio": [1.0, 2.0], "num_heads": [[1, 1, 1, 2], [1, 1, 2, 4]]}


def test_a_width_supernet_trains_and_its_narrow_subnet_is_an_ordinary_checkpoint(tmp_path) -> None:
    import dataclasses

    import yaml

    from fvlab.models import ArchConfig, create_model, extract_subnet
    from helpers import FAST_TRAINER, SYNTHETIC, run_fit

    torch.manual_seed(0)
    lit = Recording(space=WIDTH_SPACE, sandwich=1, distill=True, arch={"name": "fastervit_micro"},
                    num_classes=4, image_size=32, lr=3e-3, scheduler="none")
    before = copy.deepcopy(lit.model.state_dict())
    fit_briefly(lit, tmp_path, steps=1)
    largest, smallest = lit.extreme_subnets()
    assert (largest["dim"], largest["mlp_ratio"], smallest["dim"], smallest["mlp_ratio"]) == (16, 2.0, 8, 1.0)
    assert smallest["num_heads"] == [1, 1, 1, 2]
    after = lit.model.state_dict()
    assert not torch.equal(before["levels.3.blocks.0.mlp.fc1.weight"], after["levels.3.blocks.0.mlp.fc1.weight"])

    path = tmp_path / "narrow.pt"
    net = lit.model.eval()
    extract_subnet(net, smallest, path=path)
    saved = torch.load(path, weights_only=True)
    assert saved["arch"]["dim"] == 8 and saved["arch"]["mlp_ratio"] == 1.0
    model = create_model(None, checkpoint_path=str(path), **saved["arch"]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), net.subnet(smallest):
        assert (model(x) - net(x)).abs().max().item() <= 1e-6
    # fvlab fit starts from it like from any checkpoint (model.arch.checkpoint_path).
    fields = {f.name for f in dataclasses.fields(ArchConfig)}
    arch = {"name": None, **{k: v for k, v in saved["arch"].items() if k in fields}}
    experiment = tmp_path / "narrow.yaml"
    experiment.write_text(yaml.safe_dump({
        "name": "narrow", "seed_everything": 0, "data": SYNTHETIC, "trainer": FAST_TRAINER,
        "model": {"arch": {**arch, "checkpoint_path": str(path)}, "lr": 1e-3}}))
    assert run_fit(tmp_path, experiment) == 0
