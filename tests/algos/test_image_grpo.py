"""The image track's algorithms on a tiny model: a pretraining step lowers the flow-matching
loss, and one GRPO iteration per window mode (all = Flow-GRPO, sliding = MixGRPO, sliding +
DPM-Solver++(2M) after the window = MixGRPO-Flash) passes the ratio = 1 check and updates."""

from __future__ import annotations

import pytest
import torch

from flowrl.algos.flow_bc import flow_matching_loss
from flowrl.algos.grpo import GRPO
from flowrl.algos.image_bc import pretrain_images, shapes_batches
from flowrl.algos.policy_gradient import check_ratio
from flowrl.models.build import build_image_network, build_policy
from flowrl.rollout.prompts import make_prompt_collector
from tests.image_setup import tiny_config


def test_a_pretraining_step_lowers_the_flow_matching_loss_on_a_fixed_batch():
    cfg = tiny_config("pretrain.steps=1", "pretrain.lr=3e-3", "pretrain.ema_decay=0")
    torch.manual_seed(0)
    network = build_image_network(cfg)
    ids, images = shapes_batches(cfg, torch.device("cpu"))(0, torch.Generator().manual_seed(0))
    assert ids.shape == (8, 8) and images.shape == (8, 3, 16, 16)
    assert -1.0 <= float(images.min()) and float(images.max()) <= 1.0

    def loss_of(net) -> float:
        return flow_matching_loss(net, ids, images, torch.Generator().manual_seed(1)).item()

    before = loss_of(network)
    trained, metrics = pretrain_images(network, cfg, torch.device("cpu"), progress=False)
    assert loss_of(trained) < before and metrics["pretrain/loss"] > 0  # ema_decay 0: the trained weights


WINDOWS = {
    "all": [],
    "sliding": ["mdp.window={type: sliding, size: 2, shift_interval: 1}"],
    "flash": [
        "mdp.window={type: sliding, size: 1}",
        "mdp.solver=dpm_solver_2m",
        "mdp.steps_after_window=2",
    ],
}


@pytest.mark.parametrize("window", list(WINDOWS))
def test_one_grpo_iteration_per_window_mode_passes_the_ratio_check(window):
    cfg = tiny_config(*WINDOWS[window], "algo.beta=0.01", "policy.cfg_scale=1.5")
    torch.manual_seed(0)
    policy = build_policy(cfg, build_image_network(cfg))
    algo = GRPO(policy, cfg.algo, torch.device("cpu"), cfg.seed, cfg.env.group_size)
    collector = make_prompt_collector(cfg)
    try:
        rollout = algo.collect(collector, policy, 0)
    finally:
        collector.close()
    s = rollout.samples.steps.shape[-1]
    assert s == {"all": 4, "sliding": 2, "flash": 1}[window]
    if window == "flash":  # one window step, then 2 DPM steps for the 3 grid steps after it
        assert float(rollout.samples.nfe.max()) < cfg.policy.denoising_steps
    batch = algo.prepare(rollout)
    assert batch.advantages.shape == (4,)  # JPEG sizes differ: no group is dropped
    ratio = check_ratio(policy, batch.cond, batch.samples, cfg.algo.ratio_check_tol, algo.name)
    assert ratio["train/ratio_check_dev"] <= 1e-4
    before = [p.detach().clone() for p in policy.parameters()]
    metrics = algo.update(batch, 0)
    assert metrics["train/epochs"] == 1.0 and "losses/kl_ref" in metrics and "train/clip_fraction" in metrics
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))


def test_a_checkpoint_of_other_sizes_is_refused_in_one_line(tmp_path):
    from flowrl.models.build import CheckpointError, actor_record, load_image_network
    from flowrl.runlog import atomic_save

    cfg = tiny_config()
    atomic_save(actor_record(build_image_network(cfg), cfg.policy), tmp_path / "pretrained.pt")
    assert isinstance(load_image_network(tmp_path / "pretrained.pt", cfg), torch.nn.Module)
    with pytest.raises(
        CheckpointError,
        match=r"channels: checkpoint \[8, 8, 8\] vs experiment \[16, 16, 16\].*"
        r"set policy.channels=\[8,8,8\]",
    ):
        load_image_network(tmp_path / "pretrained.pt", tiny_config("policy.channels=[16,16,16]"))
