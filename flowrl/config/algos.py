"""The ``algo`` section of the experiment schema: one pydantic model per algorithm (PPO, GRPO,
DiffusionNFT, AWM, AC-Flow), tagged by ``algo.type``; every field with a type, a default and a
description."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from flowrl.config.base import _Strict


class PolicyGradientConfig(_Strict):
    """What PPO and GRPO share: iterations, the clipped surrogate, optimisers."""

    iterations: int = Field(50, ge=1)
    clip: float = Field(0.2, gt=0, description="ratio clip")
    epochs: int = Field(4, ge=1, description="passes over each rollout")
    minibatch_size: int = Field(
        256,
        ge=1,
        description="env steps per minibatch (each with its chain, or its S denoising-step samples); a batch that "
        "is not a multiple is cut into round(batch / minibatch_size) near-equal minibatches, never a small remainder",
    )
    actor_lr: float = Field(3e-4, gt=0, description="policy network learning rate")
    noise_lr: float = Field(3e-4, gt=0, description="noise net learning rate (reinflow / flow_noise)")
    lr_schedule: Literal["constant", "linear"] = Field(
        "constant", description="linear = anneal every learning rate to 0 over the iterations (CleanRL's anneal_lr)"
    )
    entropy_coef: float = Field(0.0, ge=0, description="bonus on the learned steps' entropy")
    max_grad_norm: float = Field(1.0, gt=0)
    target_kl: float | None = Field(
        None,
        gt=0,
        description="stop the epochs early once a minibatch's approx KL (per sample, in the units log_prob_reduce "
        "gives) exceeds this; logged as train/kl_stop; null = never",
    )
    max_skipped_updates: int = Field(
        3,
        ge=1,
        description="an update whose loss or gradient norm is non-finite is skipped; this many in a row stop the "
        "run (the last good checkpoint is kept)",
    )
    ratio_check_tol: float = Field(
        1e-4, gt=0, description="max |ratio - 1| allowed when re-evaluating a fresh rollout before the first update"
    )
    ratio_check: Literal["all", "first_minibatch"] = Field(
        "all",
        description="which samples the ratio = 1 check re-evaluates before the first update: all, or only the "
        "first minibatch_size ones (an extra no-grad pass over one minibatch instead of the whole rollout)",
    )


class PPOConfig(PolicyGradientConfig):
    """PPO over the env MDP: critic on observations, GAE over env steps."""

    @model_validator(mode="before")
    @classmethod
    def _boolean_normalisation(cls, data: Any) -> Any:
        """``normalize_advantages: true / false`` of files written before its scopes existed."""
        if isinstance(data, dict) and isinstance(data.get("normalize_advantages"), bool):
            data = {**data, "normalize_advantages": "minibatch" if data["normalize_advantages"] else "none"}
        return data

    type: Literal["ppo"]
    steps_per_iteration: int = Field(16, ge=1, description="policy (action-chunk) steps per env per iteration")
    gamma: float = Field(0.99, ge=0, le=1, description="discount per policy step")
    gae_lambda: float = Field(0.95, ge=0, le=1)
    value_clip: float | None = Field(None, gt=0, description="clip of the value update; null = unclipped")
    critic_lr: float = Field(1e-3, gt=0)
    critic_warmup_iterations: int = Field(
        0, ge=0, description="first iterations that train only the critic (a fresh critic next to a pretrained actor)"
    )
    normalize_advantages: Literal["minibatch", "batch", "none"] = Field(
        "minibatch",
        description="z-score the advantages over each minibatch (CleanRL), over the iteration's whole batch (RLinf), "
        "or not at all; true / false (older files) mean minibatch / none",
    )
    normalize_rewards: bool = Field(
        False, description="divide rewards by a running std of the discounted return (for training from scratch)"
    )
    w2_coef: float = Field(
        0.0,
        ge=0,
        description="weight of a W2 regulariser to the initial policy: mean squared distance per action "
        "dimension between both policies' deterministic actions from the same noise; 0 = off",
    )


class GRPOAdvantagesConfig(_Strict):
    """GRPO's normalisation (Flow-GRPO's PerPromptStatTracker, its statistics cleared every
    iteration: one group per prompt, so per-prompt statistics are the group's)."""

    std: Literal["group", "global"] = Field(
        "group",
        description="advantage = (r - group mean) / (std + adv_eps) with the std of the group, or of every outcome "
        "of the iteration (Flow-GRPO's global_std: a 0.75 vs 1.0 difference stays smaller than 0 vs 1)",
    )


class GRPOConfig(PolicyGradientConfig):
    """GRPO without a critic: each env runs one episode per iteration from its group's shared
    reset state; the group-normalised outcome is the advantage of every step of the episode."""

    type: Literal["grpo"]
    max_steps: int = Field(
        64,
        ge=1,
        description="policy (action-chunk) steps budget per episode; an unfinished episode scores its outcome so far",
    )
    outcome: Literal["return", "success", "success_once"] = Field(
        "return",
        description="what an episode scores: its return, its success at the end, or whether any of its steps "
        "succeeded (ManiSkill's success_once, the metric its benchmarks report)",
    )
    beta: float = Field(0.0, ge=0, description="weight of the KL to the reference (initial) policy; 0 = off")
    adv_eps: float = Field(1e-4, gt=0, description="advantage = (r - mean) / (std + adv_eps) within each group")
    ratio_norm: bool = Field(
        False,
        description="GRPO-Guard's ratio normalisation: add ||mu_theta - mu_old||^2 / (2 sigma^2) to each step's "
        "log-ratio, removing its negative bias so the clipped ratio is centred at 1 at every denoising step "
        "(fixed-std converters: flow_sde, cps)",
    )
    advantages: GRPOAdvantagesConfig = Field(
        default_factory=lambda: GRPOAdvantagesConfig(), description="how outcomes become advantages"
    )
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="evaluate an exponential moving average of the policy's weights, updated after every "
        "iteration's update with this decay (Flow-GRPO's train.ema), and write it as policy.pt; 0 = the "
        "trained weights",
    )


class LikelihoodFreeConfig(_Strict):
    """What DiffusionNFT and AWM share: no log-probs; collection with the deterministic ODE
    (``mdp.solver``) in GRPO's groups (one episode per env from group-shared resets); training
    on the forward (noising) process of the policy's own clean samples, each at every time
    t_0..t_{K-1} of the sampler's grid, with fresh noise."""

    iterations: int = Field(50, ge=1)
    epochs: int = Field(1, ge=1, description="passes over each rollout")
    minibatch_size: int = Field(256, ge=1, description="env steps (or images) per minibatch, each at all K grid times")
    actor_lr: float = Field(3e-4, gt=0, description="policy network learning rate (Adam)")
    lr_schedule: Literal["constant", "linear"] = Field(
        "constant", description="linear = anneal the learning rate to 0 over the iterations"
    )
    max_grad_norm: float = Field(1.0, gt=0)
    max_skipped_updates: int = Field(
        3,
        ge=1,
        description="an update whose loss or gradient norm is non-finite is skipped; this many in a row stop the "
        "run (the last good checkpoint is kept)",
    )
    max_steps: int = Field(
        64,
        ge=1,
        description="policy (action-chunk) steps budget per episode; an unfinished episode scores its outcome so far",
    )
    outcome: Literal["return", "success"] = Field("return", description="what an episode scores")
    adv_eps: float = Field(1e-4, gt=0, description="advantage = (r - mean) / (std + adv_eps) within each group")
    adv_clip_max: float = Field(5.0, gt=0, description="advantages are clipped to [-adv_clip_max, adv_clip_max]")
    adv_mode: Literal["all", "positive"] = Field(
        "all",
        description="all = every sample weighs by its clipped advantage; positive = advantages below 0 count as 0 "
        "(DiffusionNFT's positive_only): a worse-than-average sample holds the field where it is instead of "
        "pushing it away",
    )
    beta: float = Field(
        0.0,
        ge=0,
        description="weight of the velocity regulariser to the reference (initial) policy, mean ||v_theta - v_ref||^2 "
        "on the same noised samples; 0 = off",
    )
    old_coef: float = Field(
        0.0,
        ge=0,
        description="weight of a proximal term mean ||v_theta - v_old||^2 to the policy that collected the rollout "
        "(a trust region: AWM's ema_beta); 0 = off",
    )


class NFTConfig(LikelihoodFreeConfig):
    """DiffusionNFT (Zheng et al., ICLR 2026): flow matching of implicit positive and negative
    policies built from the current and the old velocity fields, weighted by an optimality
    probability r = clip(A, -c, c) / (2c) + 1/2 of each sample's group advantage."""

    type: Literal["nft"]
    beta: float = Field(
        1e-4,
        ge=0,
        description="weight of the velocity regulariser to the reference (initial) policy, mean ||v_theta - v_ref||^2 "
        "on the same noised samples (DiffusionNFT's 1e-4); 0 = off",
    )
    nft_beta: float = Field(
        1.0,
        gt=0,
        description="DiffusionNFT's beta: v+ = (1 - beta) v_old + beta v_theta, v- = (1 + beta) v_old - beta v_theta",
    )
    adaptive_weight: bool = Field(
        True,
        description="the paper's adaptive weighting: each sample's squared error of the clean-sample estimate "
        "x + (1 - t) v divided by its (detached) mean absolute error; false = plain ||v - (x_1 - eps)||^2",
    )
    old_decay_rate: float = Field(
        0.001,
        ge=0,
        description="the old policy (which samples and gives v_old) follows the trained one after every iteration: "
        "old <- d old + (1 - d) theta with d = min(old_decay_rate * iteration, old_decay_max)",
    )
    old_decay_max: float = Field(0.5, ge=0, lt=1, description="the largest decay d of the old policy's soft update")


class AWMConfig(LikelihoodFreeConfig):
    """Advantage-Weighted Matching (Xue et al. 2025): the pretraining flow-matching loss on the
    policy's own clean samples, each sample's error weighted by its group advantage clipped to
    [-adv_clip_max, adv_clip_max] and divided by adv_clip_max (into [-1, 1], AWM's advantage_max = 1)."""

    type: Literal["awm"]
    old_coef: float = Field(
        1.0,
        ge=0,
        description="weight of a proximal term mean ||v_theta - v_old||^2 to the policy that collected the rollout "
        "(AWM's ema_beta = 1: with the advantages scaled into [-1, 1] no row's loss is concave); 0 = off",
    )
    beta: float = Field(
        1e-3,
        ge=0,
        description="weight of the velocity regulariser to the reference (initial) policy, mean ||v_theta - v_ref||^2 "
        "on the same noised samples (AWM's GenEval setting 1e-3); 0 = off",
    )


def _either(names: tuple[str, ...]) -> str:
    """``("a", "b", "c")`` -> ``"a, b or c"``."""
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


LIKELIHOOD_FREE_ALGOS = ("nft", "awm")  # no log-probs: no ratio check, no converter or window
GROUP_ALGOS = ("grpo", *LIKELIHOOD_FREE_ALGOS)  # one episode per env from group-shared resets


class ACFlowConfig(_Strict):
    """AC-Flow (Fan et al. 2025): an actor-critic for flow policies without log-prob ratios.
    Each env runs one episode per iteration; a critic V(x_t, t, obs) learns the shaped
    reward-to-go at the chain's intermediate states, its advantages along the chain (clipped,
    after a critic warm-up) weight a flow-matching loss on the policy's own samples, and a W2
    term keeps the velocity near the initial policy's (flowrl/algos/ac_flow.py)."""

    type: Literal["ac_flow"]
    iterations: int = Field(50, ge=1)
    max_steps: int = Field(
        64,
        ge=1,
        description="policy (action-chunk) steps budget per episode; an unfinished episode scores its rewards so far",
    )
    epochs: int = Field(4, ge=1, description="passes over each rollout (critic and actor)")
    minibatch_size: int = Field(256, ge=1, description="env steps per minibatch (each with its S chain states)")
    actor_lr: float = Field(3e-4, gt=0, description="policy network learning rate")
    critic_lr: float = Field(1e-3, gt=0, description="critic learning rate")
    lr_schedule: Literal["constant", "linear"] = Field(
        "constant", description="linear = anneal both learning rates to 0 over the iterations"
    )
    max_grad_norm: float = Field(1.0, gt=0)
    max_skipped_updates: int = Field(
        3, ge=1, description="updates with a non-finite loss or gradient norm skipped in a row before the run stops"
    )
    ratio_check_tol: float = Field(
        1e-4, gt=0, description="max |ratio - 1| of the stored chain steps re-evaluated before the first update"
    )
    gamma: float = Field(1.0, ge=0, le=1, description="discount per policy step of the reward-to-go")
    reward_shaping: Literal["standardize", "none"] = Field(
        "standardize",
        description="standardize = the reward-to-go of the iteration's env steps made mean 0, std 1 (the critic's "
        "target and the advantages stay of order 1 whatever the env's reward scale); none = raw",
    )
    critic_hidden_dims: list[int] = Field(
        [256, 256], min_length=1, description="MLP widths of the critic V(x_t, t, obs) (LayerNorm, SiLU)"
    )
    critic_warmup_iterations: int = Field(
        5, ge=0, description="first iterations that train only the critic; the actor stays as it is"
    )
    chain_lambda: float = Field(
        1.0,
        ge=0,
        le=1,
        description="GAE lambda over the denoising chain: 1 = advantage G - V(x_t) (Monte Carlo), 0 = one-step TD "
        "V(x_next) - V(x_t) (the last step's next value is G)",
    )
    adv_clip: float = Field(1.0, gt=0, description="advantages clipped to [-adv_clip, adv_clip] before weighting")
    weighting: Literal["exp", "normalized_exp"] = Field(
        "exp",
        description="critic weight of a chain state: exp = exp(A / temperature); normalized_exp = the same divided "
        "by its mean over the iteration's batch (a softmax over the batch, times its size)",
    )
    temperature: float = Field(0.5, gt=0, description="temperature of the critic weights exp(A / temperature)")
    w2_coef: float = Field(
        1.0,
        ge=0,
        description="weight of the W2 regulariser: mean squared difference per dimension between the policy's and "
        "the initial policy's velocities at the same points (bounds W2 of their samples); 0 = off",
    )

    @model_validator(mode="after")
    def _actor_trains(self) -> ACFlowConfig:
        if self.critic_warmup_iterations >= self.iterations:
            raise ValueError(
                f"critic_warmup_iterations={self.critic_warmup_iterations} >= iterations={self.iterations}: the actor "
                "would never be trained; lower the warm-up or raise algo.iterations"
            )
        return self


AlgoConfig = Annotated[PPOConfig | GRPOConfig | NFTConfig | AWMConfig | ACFlowConfig, Field(discriminator="type")]
