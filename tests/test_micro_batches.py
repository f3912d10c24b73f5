"""micro_batch_size: a batch run in chunks gives the gradient and the losses of the whole batch in one pass (to float
rounding), where Lightning's gradient accumulation does not; through a Trainer, the weights after a few steps agree."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import accumulation  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from loca_lightning.pretrain import micro_batches
from loca_lightning.pretrain.module import LOCAPretrainModule

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BATCH = 12
TERMS = ("loss", "loss_location", "acc_location", "loss_cluster", "loss_me_max", "prototype_perplexity")


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return accumulation.one_batch(BATCH, seed=3)


def step(batch: dict, micro: int | None, **hparams) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One training step from the same weights and random state: the student's flat gradient, the logged terms and the
    location logits."""
    L.seed_everything(0, verbose=False)
    # drop path on and shared (the default): the masks must be the same in both ways
    module = LOCAPretrainModule(**{**accumulation.DEMO_MODEL, "drop_path_rate": 0.1, **hparams}, micro_batch_size=micro)
    logged = {}
    module.log_dict = lambda metrics, **kwargs: logged.update(metrics)  # type: ignore[method-assign]
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    torch.manual_seed(1)
    module.training_step(batch, 0).backward()
    grad = torch.cat([p.grad.flatten() for p in module.student.parameters() if p.grad is not None])
    terms = {k.removeprefix("train/"): v for k, v in logged.items()}
    return grad, terms, module.last_step["location_logits"]


@pytest.mark.parametrize("micro", [4, 5])  # 3 equal chunks; chunks of 5, 5 and 2
def test_micro_batches_give_the_whole_batch_gradient_and_losses(batch: dict, micro: int) -> None:
    whole_grad, whole_terms, whole_logits = step(batch, None)
    grad, terms, logits = step(batch, micro)
    assert float((grad - whole_grad).norm() / whole_grad.norm()) < 1e-5
    for name in TERMS:
        torch.testing.assert_close(terms[name], whole_terms[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(logits, whole_logits, rtol=1e-5, atol=1e-5)


def test_lightning_accumulation_of_the_same_chunks_does_not(batch: dict) -> None:
    # the comparison above has teeth: 3 chunks of 4 as accumulate_grad_batches runs them are far from the whole batch
    L.seed_everything(0, verbose=False)
    module = LOCAPretrainModule(**accumulation.DEMO_MODEL)
    module.log = module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    masks = (module.select_reference_keep(BATCH), module.select_query_keep(BATCH, batch["target_large"].shape[1]))
    whole, chunked = accumulation.gradient(module, batch, 1, masks), accumulation.gradient(module, batch, 3, masks)
    assert float((chunked - whole).norm() / whole.norm()) > 1e-2


def test_the_location_only_variant_too(batch: dict) -> None:
    # no teacher: the student's reference pass carries gradient and runs once per chunk
    hparams = dict(apply_cluster_loss=False)
    whole_grad, whole_terms, _ = step(batch, None, **hparams)
    grad, terms, _ = step(batch, 5, **hparams)
    assert float((grad - whole_grad).norm() / whole_grad.norm()) < 1e-5
    assert "loss_me_max" not in terms
    torch.testing.assert_close(terms["loss"], whole_terms["loss"], rtol=1e-5, atol=1e-6)


def fit(micro: int | None, accumulate: int = 1, steps: int = 3) -> LOCAPretrainModule:
    L.seed_everything(0, verbose=False)
    module = LOCAPretrainModule(**{**accumulation.DEMO_MODEL, "drop_path_rate": 0.1}, micro_batch_size=micro)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
    )
    trainer.fit(module, datamodule=accumulation.data(BATCH, seed=5))
    return module


def test_a_trainer_steps_micro_batches_like_whole_batches() -> None:
    # Lightning's zero_grad (between the step and the last chunk's backward) must not drop the first chunks; clipping,
    # the lr (from the loader's batch) and the teacher's EMA update follow as for the whole batch.
    whole, micro = fit(None), fit(4)
    assert micro.trainer.optimizers[0].param_groups[0]["lr"] == whole.trainer.optimizers[0].param_groups[0]["lr"]
    initial = LOCAPretrainModule(**{**accumulation.DEMO_MODEL, "drop_path_rate": 0.1}).state_dict()
    moved = 0.0
    for key, value in whole.state_dict().items():
        other = micro.state_dict()[key]
        if key.endswith("qkv.bias") or key.endswith("kv.bias"):
            # a key bias's gradient is exactly zero; AdamW normalises its rounding noise to +-lr (tests/test_distributed)
            torch.testing.assert_close(other, value, rtol=0, atol=3 * 5e-4, msg=key)
        else:
            torch.testing.assert_close(other, value, rtol=1e-4, atol=2e-6, msg=key)
        if value.is_floating_point():
            moved = max(moved, float((value - initial[key]).abs().max()))
    assert moved > 1e-4  # three steps moved the weights by far more than the tolerance


def test_micro_batch_size_is_checked() -> None:
    with pytest.raises(ValueError, match="micro_batch_size must be a positive number of images"):
        LOCAPretrainModule(**accumulation.DEMO_MODEL, micro_batch_size=0)
    with pytest.raises(ValueError, match=r"micro_batch_size \(4\) and trainer.accumulate_grad_batches \(2\)"):
        fit(4, accumulate=2, steps=1)
    sharded = SimpleNamespace(accumulate_grad_batches=1, strategy=FSDPStrategy())
    with pytest.raises(ValueError, match="not supported under the classic FSDPStrategy"):
        micro_batches.check_trainer(4, sharded)
    micro_batches.check_trainer(None, sharded)  # without micro-batches, anything goes


def test_chunks_cover_the_batch() -> None:
    assert micro_batches.chunks(12, 5) == [slice(0, 5), slice(5, 10), slice(10, 12)]
    assert not micro_batches.splits(None, 12) and not micro_batches.splits(12, 12) and micro_batches.splits(5, 12)


@pytest.mark.slow
def test_the_demo_config_runs_in_micro_batches_from_the_cli(tmp_path, capsys) -> None:
    from loca_lightning.cli import main

    args = [
        "fit", "--config", str(Path(__file__).parent.parent / "configs" / "demo" / "pretrain.yaml"),
        "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}", f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
        "--data.init_args.synthetic_length=8", "--data.init_args.batch_size=4", "--data.init_args.num_workers=0",
        "--data.init_args.persistent_workers=false", "--data.init_args.views.num_focal=2",
        "--model.init_args.micro_batch_size=2",
    ]  # fmt: skip
    main(args)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["hyper_parameters"]["micro_batch_size"] == 2
    with pytest.raises(SystemExit) as exit_info:  # both ways of splitting the batch: one line, exit status 2
        main([*args, "--trainer.accumulate_grad_batches=2", f"--checkpoint.dirpath={tmp_path / 'other'}"])
    assert exit_info.value.code == 2
    assert "trainer.accumulate_grad_batches (2) both split the batch" in capsys.readouterr().err
