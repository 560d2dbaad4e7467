"""SD3Policy on a tiny random-weight SD3 diffusers folder built here (tests/sd3_setup.py).

Oracles: diffusers' own FlowMatchEulerDiscreteScheduler.step and StableDiffusion3Pipeline (the
time convention, grid and CFG); peft's adapter on/off; the pipeline's load_lora_weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline  # noqa: E402

from envs.shapes import Tokenizer  # noqa: E402
from flowrl.algos.grpo import GRPO, GRPOBatch, step_kl  # noqa: E402
from flowrl.algos.policy_gradient import check_ratio  # noqa: E402
from flowrl.config import build_config  # noqa: E402
from flowrl.core.steps import euler_step  # noqa: E402
from flowrl.core.windows import AllSteps, OneRandomStep, SlidingWindow  # noqa: E402
from flowrl.errors import CheckpointError, FlowRLError  # noqa: E402
from flowrl.models.sampler import FlowSDEConverter  # noqa: E402
from flowrl.models.sd3_policy import LoRASpec, SD3Policy, check_sd3_folder, load_sd3_policy  # noqa: E402
from tests.sd3_setup import build_tiny_sd3  # noqa: E402

PROMPTS = ["", "a red circle", "a blue square", "two green triangles"]
K = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


def _policy(
    folder: Path, window=None, cfg_scale: float = 1.0, lora: LoRASpec | None = None, checkpointing: bool = False
) -> SD3Policy:
    keys = Tokenizer().encode(PROMPTS)[0]
    return load_sd3_policy(
        folder,
        PROMPTS,
        keys,
        image_size=16,
        denoising_steps=K,
        eval_denoising_steps=K,
        sampler_kwargs={"converter": FlowSDEConverter(0.7), "window": window or AllSteps()},
        lora=lora or LoRASpec(rank=4, alpha=8.0),
        cfg_scale=cfg_scale,
        max_sequence_length=8,
        gradient_checkpointing=checkpointing,
    )


def _cond(n: int = 2) -> torch.Tensor:
    ids = Tokenizer().encode(PROMPTS[1:])[0]
    return ids[torch.arange(n) % ids.shape[0]]


def _perturb_lora(policy: SD3Policy, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.lora_parameters().values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_euler_step_is_the_schedulers_step_on_its_shifted_sigmas(folder):
    policy = _policy(folder)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(K)
    assert torch.allclose(policy.sampler.grid.double(), 1.0 - scheduler.sigmas.double(), atol=1e-6)
    assert scheduler.config.shift == 3.0 and not torch.allclose(policy.sampler.grid, torch.linspace(0, 1, K + 1))
    x = torch.randn(2, *policy.event_shape, generator=torch.Generator().manual_seed(0))
    cond, grid = _cond(), policy.sampler.grid
    with torch.no_grad():
        for k, timestep in enumerate(scheduler.timesteps):
            v = policy.velocity(cond, x, grid[k])
            embeds, pooled = policy.velocity.prompts(cond)
            v_sigma = policy.transformer(
                hidden_states=x, timestep=timestep.expand(2), encoder_hidden_states=embeds, pooled_projections=pooled
            ).sample
            expected = scheduler.step(v_sigma, timestep, x).prev_sample
            ours = euler_step(x, v, grid[k], grid[k + 1]).next_x
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
            x = expected


def test_guided_ode_reproduces_the_diffusers_pipeline(folder):
    policy = _policy(folder, cfg_scale=3.0)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    cond = _cond()
    noise = torch.randn(2, *policy.event_shape, generator=torch.Generator().manual_seed(3))
    table = policy.velocity.prompts
    embeds, pooled = table(cond)
    with torch.no_grad():
        ours = policy.eval_sampler.ode(policy.velocity, cond, noise)[0]
        theirs = pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=table.embeds[:1].expand_as(embeds),
            negative_pooled_prompt_embeds=table.pooled[:1].expand_as(pooled),
            latents=noise.clone(),
            num_inference_steps=K,
            guidance_scale=3.0,
            height=16,
            width=16,
            output_type="latent",
        ).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [AllSteps(), OneRandomStep(), SlidingWindow(2, shift_interval=1)])
def test_ratio_is_one_in_every_window_mode(folder, window):
    policy = _policy(folder, window=window, cfg_scale=2.0)
    _perturb_lora(policy)  # a live adapter: the check covers the LoRA path
    cond = _cond(3)
    sample = policy.sample(cond, iteration=1, generator=torch.Generator().manual_seed(0))
    assert sample.final.shape == (3, 3, 16, 16) and sample.final.abs().max() <= 1.0  # decoded images
    assert sample.x_in.shape[2:] == (4, 8, 8)
    with torch.no_grad():
        ev = policy.evaluate(cond, sample)
    torch.testing.assert_close(ev.log_prob, sample.log_prob, atol=0, rtol=1e-6)  # sums over 256 dims
    assert check_ratio(policy, cond, sample, 1e-5, "GRPO")["train/ratio_check_dev"] <= 1e-5  # the trainer's check


def test_kl_is_exactly_zero_before_the_first_update_and_the_reference_is_the_base(folder):
    policy = _policy(folder)
    reference = policy.frozen_reference()
    cond = _cond()
    sample = policy.sample(cond, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        kl = step_kl(policy, policy.evaluate(cond, sample), reference.evaluate(cond, sample))
    assert bool((kl == 0).all())
    _perturb_lora(policy)
    with torch.no_grad():
        ours, ref = policy.evaluate(cond, sample), reference.evaluate(cond, sample)
        kl = step_kl(policy, ours, ref)
        base = _policy(folder)  # a fresh adapter (B = 0) is the base model
        torch.testing.assert_close(ref.mean, base.evaluate(cond, sample).mean)
    assert bool((kl > 0).all())
    assert policy.lora_parameters()  # the adapter is back on after the reference's evaluation
    assert not torch.equal(ours.mean, ref.mean)


def test_a_grpo_update_changes_only_the_lora_weights(folder):
    policy = _policy(folder)
    algo_cfg = {"type": "grpo", "beta": 0.01, "epochs": 1, "minibatch_size": 4}
    cfg = build_config({"name": "t", "env": {"group_size": 2}, "algo": algo_cfg})
    algo = GRPO(policy, cfg.algo, torch.device("cpu"), seed=0, group_size=2)
    cond = _cond(4)
    sample = policy.sample(cond, generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    metrics = algo.update(GRPOBatch(cond, sample, torch.tensor([1.0, -1.0, 0.5, -0.5])), 0)
    assert metrics["losses/kl_ref"] == 0.0  # the first minibatch: adapter == base
    after = dict(policy.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)
    assert set(algo.state_dict()["policy"]) == set(policy.lora_parameters())  # LoRA-only checkpoint


def test_lora_checkpoint_resumes_and_refuses_another_spec(folder, tmp_path):
    policy = _policy(folder)
    _perturb_lora(policy)
    policy.save_lora(tmp_path / "lora.safetensors")
    resumed = _policy(folder)
    resumed.load_lora(tmp_path / "lora.safetensors")
    cond, x = _cond(), torch.randn(2, *policy.event_shape)
    with torch.no_grad():
        torch.testing.assert_close(resumed.velocity(cond, x, 0.3), policy.velocity(cond, x, 0.3), atol=0, rtol=0)
    other = _policy(folder, lora=LoRASpec(rank=2, alpha=8.0))
    with pytest.raises(CheckpointError, match="rank"):
        other.load_lora(tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        other.load_lora(tmp_path / "missing.safetensors")


def test_exported_lora_loads_in_a_plain_diffusers_pipeline(folder, tmp_path):
    policy = _policy(folder, lora=LoRASpec(rank=4, alpha=2.0))  # alpha != rank: the scale must travel
    _perturb_lora(policy)
    export = policy.export_lora(tmp_path / "export")
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    cond = _cond()
    embeds, pooled = policy.velocity.prompts(cond)
    x, timestep = torch.randn(2, *policy.event_shape), torch.full((2,), 700.0)
    kwargs = {"hidden_states": x, "timestep": timestep, "encoder_hidden_states": embeds, "pooled_projections": pooled}
    with torch.no_grad():
        plain = pipe.transformer(**kwargs).sample
        pipe.load_lora_weights(export)
        loaded = pipe.transformer(**kwargs).sample
        ours = policy.transformer(**kwargs).sample
    assert not torch.allclose(plain, ours)
    torch.testing.assert_close(loaded, ours, atol=1e-5, rtol=1e-5)


def test_missing_or_foreign_folders_are_one_line(tmp_path):
    with pytest.raises(FlowRLError, match="not found") as missing:
        check_sd3_folder(tmp_path / "nowhere")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(FlowRLError, match="not a diffusers Stable Diffusion 3 folder") as foreign:
        check_sd3_folder(tmp_path / "other")
    assert "\n" not in str(missing.value) and "\n" not in str(foreign.value)


def test_gradient_checkpointing_gives_the_same_lora_gradients(folder):
    cond, x = _cond(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    grads, state = [], None
    for checkpointing in (False, True):
        policy = _policy(folder, checkpointing=checkpointing)
        _perturb_lora(policy)
        state = state or policy.state_dict()
        policy.load_state_dict(state)  # the same LoRA in both (peft draws A at random)
        policy.velocity(cond, x, 0.4).square().sum().backward()
        grads.append({n: p.grad for n, p in policy.lora_parameters().items()})
    assert _policy(folder, checkpointing=True).transformer.gradient_checkpointing
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad)
