"""The image track's algorithms on a tiny model: a pretraining step lowers the flow-matching
loss, one GRPO iteration per window mode (all = Flow-GRPO, sliding = MixGRPO, sliding +
DPM-Solver++(2M) after the window = MixGRPO-Flash) passes the ratio = 1 check and updates,
and a few GRPO iterations through the Trainer raise the verifier reward of a briefly
pretrained model on its training prompts by a clear margin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from envs.shapes import Scene, SceneObject, Tokenizer, parse_caption, render
from flowrl.algos.bc import fit
from flowrl.algos.flow_bc import flow_matching_loss
from flowrl.algos.grpo import GRPO
from flowrl.algos.image_bc import pretrain_images, shapes_batches
from flowrl.algos.policy_gradient import check_ratio
from flowrl.algos.trainer import Trainer
from flowrl.models.build import build_image_network, build_policy
from flowrl.models.image_policy import from_pixels, to_pixels
from flowrl.models.text_image import drop_captions
from flowrl.rewards import ImageBatch
from flowrl.rewards.verifier import ShapesVerifier
from flowrl.rollout.prompts import PROMPT_STREAM, PromptCollector, make_prompt_collector
from flowrl.runtime import derive_seed
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


@pytest.mark.parametrize("advantages", ["sum", "per_reward"])
def test_a_multi_reward_gives_advantages_of_its_sum_or_of_each_reward(advantages):
    """Against a direct computation: the components scored again on the rollout's images, each
    group normalised by hand (population std), then weighted and summed, or summed first."""
    from flowrl.rewards.jpeg import JpegReward

    weights = {"verifier": 1.0, "jpeg_compressibility": 0.25}
    reward = (
        f"{{type: multi, advantages: {advantages}, components: [{{type: verifier}}, {{type: jpeg, weight: 0.25}}]}}"
    )
    cfg = tiny_config(f"env.reward={reward}", "env.prompts_per_iteration=3", "env.group_size=3")
    torch.manual_seed(0)
    policy = build_policy(cfg, build_image_network(cfg))
    algo = GRPO(policy, cfg.algo, torch.device("cpu"), cfg.seed, cfg.env.group_size)
    collector = make_prompt_collector(cfg)
    try:
        rollout = algo.collect(collector, policy, 0)
        prompts = [p for p in collector.prompts(0) for _ in range(3)]
    finally:
        collector.close()
    batch = ImageBatch(to_pixels(rollout.samples.final[0]), prompts)
    scores = {"verifier": ShapesVerifier()(batch).scores, "jpeg_compressibility": JpegReward()(batch).scores}

    def normalised(r: torch.Tensor) -> torch.Tensor:
        r = r.double().view(3, 3)
        return ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + cfg.algo.adv_eps)).flatten()

    if advantages == "per_reward":
        assert rollout.reward_weights == weights and set(rollout.reward_components) == set(weights)
        expected = sum(w * normalised(scores[name]) for name, w in weights.items())
    else:
        assert rollout.reward_components is None
        expected = normalised(sum(w * scores[name] for name, w in weights.items()))
    prepared = algo.prepare(rollout)
    assert prepared.advantages.shape == (9,)  # JPEG sizes differ: no group is dropped
    assert torch.allclose(prepared.advantages.double(), expected, atol=1e-4)


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


# The learning test's world: four single-colour training captions, each drawn as one centred
# shape of the largest size. A network of ~70k parameters learns that in a few hundred steps
# (the world's random layouts take thousands), and stopping there leaves it imperfect: wrong
# colours, smeared shapes, and a verifier reward that varies within a prompt's group.
COLOUR_PROMPTS = ("a red circle", "a green square", "a blue triangle", "a yellow diamond")
MEASURE_SEED = 10**6 + 3  # the measuring samples' own noise, apart from the training streams (derive_seed)
MEASURE_PER_PROMPT = 64


def _colour_world_config():
    return tiny_config(
        "policy.channels=[16,16,16]",
        "policy.text_dim=16",
        "policy.time_dim=16",
        "mdp.converter={type: cps, noise_level: 0.7}",  # its last step is noise-free: clean images
        "env.reward={type: verifier}",
        "env.prompts_per_iteration=8",
        "env.group_size=8",
        "env.prompts_per_chunk=8",
        "pretrain.steps=300",
        "pretrain.batch_size=16",
        "pretrain.lr=1e-2",
        "pretrain.ema_decay=0",
        "algo.iterations=20",
        "algo.actor_lr=1e-3",
        "algo.minibatch_size=64",
        "algo.beta=0",
        "eval.every=20",
        "checkpoint_every=20",
    )


def _centred_pairs(batch_size: int, image_size: int):
    """``draw(step, generator)`` for ``fit``: captions of COLOUR_PROMPTS with their centred shape."""
    tokenizer = Tokenizer()

    def draw(step: int, generator: torch.Generator):
        rng = np.random.default_rng(step)
        captions = [COLOUR_PROMPTS[i] for i in rng.integers(len(COLOUR_PROMPTS), size=batch_size)]
        scenes = []
        for caption in captions:
            (shape, colour), *_ = parse_caption(caption).objects
            scenes.append(Scene((SceneObject(shape, colour, 0.5, 0.5, 0.19),)))
        ids = drop_captions(tokenizer.encode(captions)[0], 0.1, generator)
        return ids, from_pixels(render(scenes, image_size))

    return draw


class ColourPromptCollector(PromptCollector):
    """The prompt collector with its prompts drawn from COLOUR_PROMPTS only."""

    def prompts(self, iteration: int) -> list[str]:
        rng = np.random.default_rng(derive_seed(self.seed, PROMPT_STREAM, iteration))
        return [COLOUR_PROMPTS[i] for i in rng.integers(len(COLOUR_PROMPTS), size=self.prompts_per_iteration)]


class TrainingPromptReward:
    """The Trainer's evaluator here: the verifier's score of MEASURE_PER_PROMPT fresh samples
    of each training prompt, drawn with the training sampler from one fixed noise seed, so the
    evaluation before and after training pairs every image with one from the same noise.
    Keeps the per-image scores ``[4 * MEASURE_PER_PROMPT]`` of each evaluation."""

    def __init__(self) -> None:
        self.captions = [p for p in COLOUR_PROMPTS for _ in range(MEASURE_PER_PROMPT)]
        self.ids = Tokenizer().encode(self.captions)[0]
        self.verifier = ShapesVerifier()
        self.scores: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, policy, iteration: int, env_steps: int = 0) -> dict[str, float]:
        sample = policy.sample(self.ids, iteration, torch.Generator().manual_seed(MEASURE_SEED))
        scored = self.verifier(ImageBatch(to_pixels(sample.final), self.captions))
        self.scores[iteration] = scored.scores
        return {
            "eval/return": float(scored.scores.mean()),
            "eval/success_rate": float(scored.details["correct"].mean()),
        }


def test_a_few_grpo_iterations_raise_the_verifier_reward_on_the_training_prompts(tmp_path):
    cfg = _colour_world_config()
    torch.manual_seed(cfg.seed)
    draw = _centred_pairs(cfg.pretrain.batch_size, cfg.env.image_size)
    network, _ = fit(build_image_network(cfg), draw, flow_matching_loss, cfg.pretrain, cfg.seed, progress=False)
    policy = build_policy(cfg, network)
    algo = GRPO(policy, cfg.algo, torch.device("cpu"), cfg.seed, cfg.env.group_size)
    env = cfg.env
    collector = ColourPromptCollector(
        make_prompt_collector(cfg).rewards, cfg.seed, env.prompts_per_iteration, env.group_size, env.prompts_per_chunk
    )
    measure = TrainingPromptReward()
    result = Trainer(cfg, tmp_path, policy, algo, torch.device("cpu"), False, measure).run(collector)

    before, after = measure.scores[0], measure.scores[cfg.algo.iterations]
    assert 0.05 < float(before.mean()) < 0.6  # imperfect, yet with a reward to improve on
    gain = after - before  # paired: the same noise before and after
    std_error = float(gain.std() / len(gain) ** 0.5)
    assert float(gain.mean()) > 0.1 and float(gain.mean()) > 5 * std_error, (float(gain.mean()), std_error)
    assert result["after"]["eval/return"] == pytest.approx(float(after.mean()))


def test_a_stopped_image_run_resumes_where_it_stopped(tmp_path):
    """An image run stopped after its iteration-2 checkpoint and resumed to 4 iterations logs
    iterations 0-4 once each and equals an uninterrupted run with the same seed, metric for
    metric (prompts and noise are drawn from (seed, iteration), so nothing depends on the stop)."""
    import json

    from flowrl import experiment as ex

    def records(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]

    reference = tmp_path / "reference"
    reference.mkdir()
    ex.train(tiny_config("algo.iterations=4", "checkpoint_every=2"), reference, progress=False)
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    ex.train(tiny_config("algo.iterations=2", "checkpoint_every=2"), stopped, progress=False)
    ex.train(ex.load_run_config(stopped, ["algo.iterations=4"]), stopped, resume=True, progress=False)
    resumed, expected = records(stopped), records(reference)
    assert [r["iteration"] for r in resumed] == [0, 1, 2, 3, 4]
    assert resumed == expected
    assert (stopped / "policy.pt").is_file()


def test_ratio_norm_centres_each_steps_log_ratio_at_zero():
    """GRPO-Guard's ratio normalisation against closed forms and Monte Carlo: with x drawn from
    the old step N(mu_old, sigma^2), the plain log-ratio has mean -||dmu||^2 / (2 sigma^2) (a
    different bias at every step, here sigma 0.1 / 0.5 / 1.0), the normalised one equals
    (x - mu_old) . dmu / sigma^2 and has mean 0."""
    from flowrl.algos.grpo import normalised_log_prob
    from flowrl.models.policy import Evaluation

    gen = torch.Generator().manual_seed(0)
    n, steps, dims = 200_000, 3, 4
    sigma = torch.tensor([0.1, 0.5, 1.0]).view(1, steps, 1)
    mu_old = torch.randn((1, steps, dims), generator=gen).expand(n, -1, -1)
    mu_new = mu_old + 0.05 * torch.randn((1, steps, dims), generator=gen)
    x = mu_old + sigma * torch.randn((n, steps, dims), generator=gen)
    log_new = torch.distributions.Normal(mu_new, sigma).log_prob(x).sum(-1)
    log_old = torch.distributions.Normal(mu_old, sigma).log_prob(x).sum(-1)
    evaluation = Evaluation(log_prob=log_new, entropy=torch.zeros(n), mean=mu_new, std=sigma.expand(n, -1, dims))
    plain = log_new - log_old
    normalised = normalised_log_prob(evaluation, mu_old) - log_old
    dmu = mu_new - mu_old
    bias = -(dmu[0] ** 2).sum(-1) / (2 * sigma.view(steps) ** 2)
    torch.testing.assert_close(
        normalised, ((x - mu_old) * dmu).sum(-1) / sigma.view(1, steps) ** 2, rtol=1e-4, atol=1e-4
    )
    stderr = plain.std(0) / n**0.5
    assert ((plain.mean(0) - bias).abs() < 5 * stderr).all(), (plain.mean(0), bias)
    assert (normalised.mean(0).abs() < 5 * stderr).all() and (bias.abs() > 20 * stderr).any()


def test_ratio_norm_keeps_the_first_gradient_and_runs_an_update():
    """At the rollout's parameters the normalisation adds nothing to the gradient (its term is
    quadratic in dmu); an update with it runs and logs finite metrics."""
    from flowrl.algos.grpo import normalised_log_prob
    from flowrl.core.transitions import unit_values

    cfg = tiny_config("algo.ratio_norm=true", "mdp.converter={type: cps, noise_level: 0.7}")
    torch.manual_seed(0)
    policy = build_policy(cfg, build_image_network(cfg))
    algo = GRPO(policy, cfg.algo, torch.device("cpu"), cfg.seed, cfg.env.group_size)
    collector = make_prompt_collector(cfg)
    try:
        batch = algo.prepare(algo.collect(collector, policy, 0))
    finally:
        collector.close()
    old_mean = algo._old_means(batch)

    def grads(normalise: bool) -> list[torch.Tensor]:
        policy.zero_grad()
        evaluation = policy.evaluate(batch.cond, batch.samples)
        per_step = normalised_log_prob(evaluation, old_mean) if normalise else evaluation.log_prob
        unit_values(per_step, *algo._unit).sum().backward()
        return [p.grad.clone() for p in policy.parameters() if p.grad is not None]

    for a, b in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    metrics = algo.update(batch, 0)
    assert all(np.isfinite(v) for v in metrics.values()) and metrics["train/epochs"] >= 1


def test_ratio_norm_needs_a_fixed_std_converter():
    from flowrl.config import ConfigError

    with pytest.raises(ConfigError, match="ratio_norm"):
        tiny_config(
            "algo.ratio_norm=true",
            data={
                "policy": {"type": "rectified_flow", "horizon": 4},
                "env": {"id": "flowrl/TwoGoal-v0", "num_envs": 4, "group_size": 2, "num_workers": 1},
                "mdp": {"converter": {"type": "reinflow"}},
            },
        )
