"""The image track's algorithms on a tiny model: a pretraining step lowers the flow-matching
loss, one GRPO iteration per window mode (all = Flow-GRPO, sliding = MixGRPO, sliding +
DPM-Solver++(2M) after the window = MixGRPO-Flash) passes the ratio = 1 check and updates,
and a few GRPO iterations through the Trainer raise the verifier reward of a briefly
pretrained model on its training prompts, whatever the CPU's float kernels (three runs pooled;
the bound comes from ten seeds on three stand-ins for kernels and a coin-flip control, see
LEARNING_SEEDS).

``python -m tests.algos.test_image_grpo --seeds 0-9`` prints the learning runs' gains per seed."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

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
from flowrl.rollout.reward_workers import RewardPool
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

# The learning test's bound comes from the gain (the verifier reward after - before, image by
# image on the same noise) of one run per seed, on this machine's CPU and on two stand-ins for
# another's (--threads 2; --perturb 1e-3 scales each initial weight by 1 + 1e-3 N(0, 1)): the
# same seed rounds differently on other kernels, and its run diverges. Reproduce a row with
#   python -m tests.algos.test_image_grpo --seeds 0-9 [--threads 2] [--perturb 1e-3] [--coin-flips]
#
#   seed                  0      1      2      3      4      5      6      7      8      9
#   1 thread          +0.31  +0.42  +0.14  +0.49  +0.33  +0.23  +0.37  +0.10  +0.22  -0.05
#   --perturb 1e-3    +0.26  +0.08  +0.17  +0.33  +0.16  +0.34  +0.07  +0.26  +0.48  +0.01
#   --threads 2       +0.17  +0.21  +0.20  +0.45  +0.50  +0.27  +0.28  +0.17  +0.38  +0.18
#   --coin-flips      +0.08  -0.12  -0.32  -0.14  -0.12  -0.10  +0.09  -0.42  -0.13  -0.15
#
# One run is no test that holds on every CPU: over these 30 runs the gain has mean 0.25, sd 0.14
# and minimum -0.05 (an earlier single-run version of this test, 8 prompts per iteration and
# pretrain.lr 1e-2, failed its own bounds on 3 of seeds 0-9 here, and seed 0 on another machine).
# Nor is a GRPO update small: on coin-flip rewards (--coin-flips: no signal, the same update
# sizes) the reward drifts by -0.13 on average, and up to +0.09. So the test
# pools three runs (LEARNING_SEEDS) and asks their mean gain to exceed MIN_MEAN_GAIN. Drawing
# three runs at random from the 30 learning runs above (with replacement), their mean is at
# most 0.02 with probability 0.1% (only the three lowest together, 0.01, come below it); three
# from the coin-flip row exceed 0.02 with probability 2%; a learning rate near 0 gains exactly
# 0 and fails. The three runs take ~50 s on one idle core (the suite's one torch thread).
LEARNING_SEEDS = (0, 1, 2)
MIN_MEAN_GAIN = 0.02


def _colour_world_config(*overrides: str):
    return tiny_config(
        "policy.channels=[16,16,16]",
        "policy.text_dim=16",
        "policy.time_dim=16",
        "mdp.converter={type: cps, noise_level: 0.7}",  # its last step is noise-free: clean images
        "env.reward={type: verifier}",
        "env.prompts_per_iteration=32",  # 32 groups of 8 per update: with 8 or 16 the drift swamped more runs
        "env.group_size=8",
        "env.prompts_per_chunk=16",
        "pretrain.steps=300",
        "pretrain.batch_size=16",
        "pretrain.lr=5e-3",  # 1e-2 left about one seed in ten with an untrained model (verifier reward 0)
        "pretrain.ema_decay=0",
        "algo.iterations=20",
        "algo.actor_lr=1e-3",
        "algo.minibatch_size=256",
        "algo.beta=0",
        "eval.every=20",
        "checkpoint_every=20",
        *overrides,
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


class CoinFlipReward:
    """The control's reward: 0 or 1 with equal odds whatever the image (nothing to learn)."""

    name = "coin_flip"

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch: ImageBatch) -> torch.Tensor:
        return (torch.rand(len(batch), generator=self.generator) < 0.5).float()


def learning_run(seed: int, run_dir: Path, coin_flips: bool = False, perturb: float = 0.0) -> tuple[float, float]:
    """Pretrains a model on the colour world, then runs GRPO on it through the Trainer with the
    verifier's reward (``coin_flips``: with CoinFlipReward); returns (the verifier reward on the
    training prompts before, the gain after - before), paired image by image. ``perturb``: each
    initial weight times 1 + perturb * N(0, 1) (a stand-in for another CPU's rounding)."""
    cfg = _colour_world_config(f"seed={seed}")
    torch.manual_seed(cfg.seed)
    network = build_image_network(cfg)
    if perturb:
        generator = torch.Generator().manual_seed(12345 + seed)  # apart from the run's own streams
        with torch.no_grad():
            for weight in network.parameters():
                weight.mul_(1 + perturb * torch.randn(weight.shape, generator=generator))
    draw = _centred_pairs(cfg.pretrain.batch_size, cfg.env.image_size)
    network, _ = fit(network, draw, flow_matching_loss, cfg.pretrain, cfg.seed, progress=False)
    policy = build_policy(cfg, network)
    algo = GRPO(policy, cfg.algo, torch.device("cpu"), cfg.seed, cfg.env.group_size)
    env = cfg.env
    rewards = (
        RewardPool(functools.partial(CoinFlipReward, seed), use_ray=False)
        if coin_flips
        else make_prompt_collector(cfg).rewards
    )
    collector = ColourPromptCollector(
        rewards, cfg.seed, env.prompts_per_iteration, env.group_size, env.prompts_per_chunk
    )
    measure = TrainingPromptReward()
    run_dir.mkdir(parents=True, exist_ok=True)
    result = Trainer(cfg, run_dir, policy, algo, torch.device("cpu"), False, measure).run(collector)
    before, after = measure.scores[0], measure.scores[cfg.algo.iterations]
    assert result["after"]["eval/return"] == pytest.approx(float(after.mean()))  # the Trainer saw this evaluation
    return float(before.mean()), float((after - before).mean())


def _mean_gain(seeds: tuple[int, ...], tmp_path: Path, coin_flips: bool = False) -> tuple[float, list[float]]:
    gains = []
    for seed in seeds:
        before, gain = learning_run(seed, tmp_path / f"seed_{seed}", coin_flips)
        assert 0.05 < before < 0.9, (seed, before)  # imperfect, yet with a reward to improve on
        gains.append(gain)
    return sum(gains) / len(gains), gains


def test_a_few_grpo_iterations_raise_the_verifier_reward_on_the_training_prompts(tmp_path):
    """Three runs (LEARNING_SEEDS) of 300 pretraining steps and 20 GRPO iterations: their mean
    gain exceeds MIN_MEAN_GAIN (the table above says why three runs, and why this bound)."""
    mean, gains = _mean_gain(LEARNING_SEEDS, tmp_path)
    assert mean > MIN_MEAN_GAIN, gains


@pytest.mark.slow
@pytest.mark.parametrize("seeds", [(3, 4, 5), (6, 7, 8), (9, 10, 11)])
def test_the_learning_bound_holds_for_other_seeds(seeds, tmp_path):
    mean, gains = _mean_gain(seeds, tmp_path)
    assert mean > MIN_MEAN_GAIN, gains


@pytest.mark.slow
def test_grpo_on_coin_flip_rewards_fails_the_learning_bound(tmp_path):
    """The control: the same runs on rewards that carry no signal end below the bound (their
    updates degrade the model on average), so the learning test measures learning."""
    mean, gains = _mean_gain(LEARNING_SEEDS, tmp_path, coin_flips=True)
    assert mean < MIN_MEAN_GAIN, gains


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


def _main() -> None:
    """Prints one row per seed: the learning run's verifier reward before and its gain."""
    import tempfile

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("--seeds", default="0-9", help="first-last, e.g. 0-9")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads (the suite uses 1)")
    parser.add_argument("--perturb", type=float, default=0.0, help="relative noise on the initial weights")
    parser.add_argument("--coin-flips", action="store_true", help="the control: GRPO on coin-flip rewards")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    first, last = (int(x) for x in args.seeds.split("-"))
    for seed in range(first, last + 1):
        with tempfile.TemporaryDirectory() as folder:
            before, gain = learning_run(seed, Path(folder), args.coin_flips, args.perturb)
        print(f"seed {seed}: before {before:.3f}, gain {gain:+.3f}", flush=True)


if __name__ == "__main__":
    _main()
