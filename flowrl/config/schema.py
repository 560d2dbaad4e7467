"""The experiment schema: one pydantic model per section, every field with a type, a default
and a description. Tagged sections (``env.type``, ``policy.type``, ``algo.type``, the
converter's and window's ``type``) hold only the keys of their kind."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, model_serializer, model_validator

from flowrl.config.algos import (  # noqa: F401 (re-exported: the schema's algorithm section)
    GROUP_ALGOS,
    LIKELIHOOD_FREE_ALGOS,
    ACFlowConfig,
    AlgoConfig,
    AWMConfig,
    GRPOAdvantagesConfig,
    GRPOConfig,
    LikelihoodFreeConfig,
    NFTConfig,
    PolicyGradientConfig,
    PPOConfig,
    _either,
)
from flowrl.config.base import _Strict
from flowrl.config.images import SD3PolicyConfig, ShapesEnvConfig, TextImagePolicyConfig


# --------------------------------------------------------------------------- env
class GymEnvConfig(_Strict):
    """gymnasium tasks (flowrl's own and MuJoCo), stepped on the CPU by env workers."""

    type: Literal["gym"] = Field("gym", description="env family: gym (gymnasium tasks registered by `envs`)")
    id: str = Field("flowrl/TwoGoal-v0", description="gymnasium id of a task registered by `envs`")
    num_envs: int = Field(16, ge=1, description="parallel envs used to collect rollouts (over all workers)")
    num_workers: int = Field(
        2,
        ge=1,
        description="env workers, each owning num_envs / num_workers envs: Ray actors, or in-process shards "
        "when ray.enabled is false (same seeds, same rollouts either way)",
    )
    group_size: int = Field(
        1, ge=1, description="GRPO: every group_size consecutive envs reset from the same seed (same start state)"
    )
    kwargs: dict[str, Any] = Field({}, description="keyword arguments of the env's constructor (gym.make)")
    batched: bool = Field(
        False,
        description="ManiSkill tasks: simulate all num_envs envs as one batch in the learner's process, tensors on "
        "the learner's device (physx_cuda on a GPU; the CPU allows num_envs 1); false = one env per instance, "
        "stepped by env workers",
    )

    @model_validator(mode="after")
    def _split(self) -> GymEnvConfig:
        if self.batched and self.num_workers != 1:
            raise ValueError(
                "env.batched simulates every env in the learner's process: set env.num_workers: 1 "
                f"(got {self.num_workers})"
            )
        if self.num_envs % self.num_workers:
            raise ValueError(f"num_envs={self.num_envs} must be a multiple of num_workers={self.num_workers}")
        per_worker = self.num_envs // self.num_workers
        if per_worker % self.group_size:
            raise ValueError(
                f"each worker's {per_worker} envs must hold whole groups of group_size={self.group_size}: "
                "make num_envs / num_workers a multiple of group_size"
            )
        return self


def _env_tag(value: Any) -> str:
    return str(value.get("type", "gym") if isinstance(value, dict) else getattr(value, "type", None))


EnvConfig = Annotated[
    Annotated[GymEnvConfig, Tag("gym")] | Annotated[ShapesEnvConfig, Tag("shapes")],
    Discriminator(_env_tag, custom_error_type="env_type", custom_error_message="unknown env type"),
]
ENV_TYPES = ("gym", "shapes")


# --------------------------------------------------------------------------- Ray
class RayConfig(_Strict):
    enabled: bool = Field(True, description="env workers as Ray actors; false = the same workers in this process")
    address: str | None = Field(
        None, description="null = start a local Ray; 'auto' or 'HOST:PORT' = join a running cluster"
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (null = all of this machine)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per env worker")
    max_restarts: int = Field(3, ge=0, description="restarts of a failed worker within one iteration")

    def _inactive(self) -> dict[str, str]:
        if not self.enabled:
            why = "with ray.enabled: true"
            return {k: why for k in ("address", "num_cpus", "cpus_per_worker", "max_restarts")}
        if self.address is not None:
            return {"num_cpus": "to a local Ray (ray.address: null)"}
        return {}


# --------------------------------------------------------------------------- learner
class LearnerConfig(_Strict):
    """The learner's processes: one in-process learner, or data-parallel ranks on Ray joined by
    torch.distributed (flowrl.algos.distributed)."""

    num_workers: int = Field(
        1,
        ge=1,
        description="learner ranks; 1 = the update runs in this process (no Ray, no process group); N > 1 = N Ray "
        "actors, each updating on 1/N of every minibatch, gradients averaged by DDP",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend: auto = nccl when each rank has a GPU, else gloo (CPU)"
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp = every rank holds the whole model, DistributedDataParallel averages the gradients; fsdp = "
        "torch's fully_shard (FSDP2): each rank holds 1/N of the trained networks' parameters and Adam moments, "
        "gathered for each forward and backward, gradients reduce-scattered",
    )
    resources_per_worker: dict[str, float] = Field(
        {"CPU": 1.0},
        description="Ray resources each rank reserves: CPU, GPU (one each for nccl), or a custom resource",
    )
    timeout_s: float = Field(
        300.0,
        gt=0,
        description="process-group timeout: a collective waiting longer on a dead or stuck rank fails instead of "
        "hanging",
    )

    def _inactive(self) -> dict[str, str]:
        if self.num_workers == 1:
            why = "to data-parallel learners (learner.num_workers > 1)"
            return {k: why for k in ("backend", "strategy", "resources_per_worker", "timeout_s")}
        return {}

    @model_validator(mode="after")
    def _resources(self) -> LearnerConfig:
        bad = {k: v for k, v in self.resources_per_worker.items() if v < 0}
        if bad:
            raise ValueError(f"learner.resources_per_worker must be >= 0, got {bad}")
        gpus = self.resources_per_worker.get("GPU", 0.0)
        if self.backend == "nccl" and gpus < 1:
            raise ValueError(
                "learner.backend: nccl needs a GPU per rank: set learner.resources_per_worker.GPU=1 (or backend gloo)"
            )
        if self.backend == "gloo" and gpus > 0:
            raise ValueError(
                "learner.backend: gloo runs the ranks on the CPU; remove learner.resources_per_worker.GPU or use "
                "backend auto / nccl"
            )
        return self

    @property
    def resolved_backend(self) -> str:
        """gloo or nccl (auto: nccl when each rank reserves a GPU)."""
        if self.backend != "auto":
            return self.backend
        return "nccl" if self.resources_per_worker.get("GPU", 0.0) >= 1 else "gloo"


# --------------------------------------------------------------------------- policy
FLOW_TYPES = ("rectified_flow", "shortcut", "meanflow")
POLICY_TYPES = (*FLOW_TYPES, "diffusion", "gaussian")  # the policies of gym envs
IMAGE_POLICY_TYPES = ("text_image", "sd3")  # the policies of env.type: shapes


class _PolicyBase(_Strict):
    horizon: int = Field(4, ge=1, description="action chunk length Ta executed per policy step")
    hidden_dims: list[int] = Field([256, 256], min_length=1, description="MLP widths of the policy network")
    obs_norm: Literal["dataset", "running", "none"] = Field(
        "dataset",
        description="observation normalisation: dataset = mean/std of the demonstrations, frozen (kept from "
        "policy.pretrained when given); running = running estimate over the rollouts (training from scratch); "
        "none",
    )
    pretrained: str | None = Field(
        None, description="checkpoint of a pretrained policy; null = pretrain from `pretrain` first"
    )


class FlowPolicyConfig(_PolicyBase):
    """Flow policies, made into an MDP by `mdp` (converter, window, solver)."""

    type: Literal["rectified_flow", "shortcut", "meanflow"] = Field(
        "rectified_flow",
        description="policy family: rectified_flow (velocity v(x, t)); shortcut (step-size-conditioned velocity, "
        "self-consistency); meanflow (average velocity u(x, t, t_next), one-step); diffusion (DDPM/DDIM "
        "epsilon model, the DPPO baseline); gaussian (mean MLP + learned std, the Gaussian PPO baseline)",
    )
    denoising_steps: int = Field(4, ge=1, description="K, integration steps of the flow")
    time_shift: float = Field(
        1.0, gt=0, description="SD3-style time-grid shift; 1 = uniform grid, > 1 = more steps near the noise end"
    )
    time_embed_dim: int = Field(32, ge=2, description="sinusoidal time-embedding size (even)")


class DiffusionPolicyConfig(_PolicyBase):
    """DDPM/DDIM epsilon-prediction policy (the DPPO baseline): every denoising step is a PPO sample."""

    type: Literal["diffusion"]
    denoising_steps: int = Field(4, ge=1, description="K, DDIM sampling steps (<= train_steps)")
    time_embed_dim: int = Field(32, ge=2, description="sinusoidal time-embedding size (even)")
    train_steps: int = Field(20, ge=1, description="DDPM training steps T (cosine schedule)")
    min_std: float = Field(0.1, ge=0, description="lower bound of every denoising step's std when sampling (DPPO)")
    denoised_clip: float | None = Field(
        1.0, gt=0, description="clip of the predicted clean action chunk; null = no clip"
    )

    @model_validator(mode="after")
    def _steps(self) -> DiffusionPolicyConfig:
        if self.denoising_steps > self.train_steps:
            raise ValueError(
                f"denoising_steps={self.denoising_steps} > train_steps={self.train_steps}: a diffusion policy "
                "samples at most its training steps; lower denoising_steps or raise train_steps"
            )
        if self.denoising_steps == 1 and self.min_std == 0:
            raise ValueError(
                "denoising_steps: 1 with min_std: 0 has no stochastic step (the only step lands on the clean "
                "actions with zero std), so there is nothing to train; set min_std > 0 or denoising_steps >= 2"
            )
        return self


class GaussianPolicyConfig(_PolicyBase):
    """Mean MLP + learned std (the Gaussian PPO baseline and the expert)."""

    type: Literal["gaussian"]
    init_std: float = Field(0.5, gt=0, description="initial action std")


def _policy_tag(value: Any) -> str:
    kind = value.get("type", "rectified_flow") if isinstance(value, dict) else getattr(value, "type", None)
    return "flow" if kind in FLOW_TYPES else str(kind)


PolicyConfig = Annotated[
    Annotated[FlowPolicyConfig, Tag("flow")]
    | Annotated[DiffusionPolicyConfig, Tag("diffusion")]
    | Annotated[GaussianPolicyConfig, Tag("gaussian")]
    | Annotated[TextImagePolicyConfig, Tag("text_image")]
    | Annotated[SD3PolicyConfig, Tag("sd3")],
    Discriminator(_policy_tag, custom_error_type="policy_type", custom_error_message="unknown policy type"),
]


# --------------------------------------------------------------------------- MDP
class NoiseNetConverter(_Strict):
    """ReinFlow (noise net on obs, t) or Flow-Noise (noise net on obs, t and the sample x)."""

    type: Literal["reinflow", "flow_noise"]
    std_min: float = Field(0.08, gt=0, description="lower bound of the learned exploration std")
    std_max: float = Field(0.16, gt=0, description="upper bound of the learned exploration std")
    hidden_dims: list[int] = Field([64, 64], min_length=1, description="noise-net MLP widths")

    @model_validator(mode="after")
    def _range(self) -> NoiseNetConverter:
        if self.std_min >= self.std_max:
            raise ValueError(
                f"noise range is inverted or empty: std_min={self.std_min} >= std_max={self.std_max}; "
                "set std_min < std_max"
            )
        return self


class FlowSDEConverterConfig(_Strict):
    """Flow-SDE: drift-corrected SDE with the ODE's marginals (Flow-GRPO, piRL flow_sde)."""

    type: Literal["flow_sde"]
    noise_level: float = Field(0.7, gt=0, description="a in s_t = a sqrt((1 - t) / t)")


class CPSConverterConfig(_Strict):
    """Coefficients-preserving sampling."""

    type: Literal["cps"]
    noise_level: float = Field(0.7, gt=0, le=1, description="a in std = (1 - t') sin(a pi / 2)")


ConverterConfig = Annotated[
    NoiseNetConverter | FlowSDEConverterConfig | CPSConverterConfig, Field(discriminator="type")
]


class AllStepsWindow(_Strict):
    type: Literal["all"]


class OneRandomStepWindow(_Strict):
    type: Literal["one_random"]


class SlidingWindowConfig(_Strict):
    type: Literal["sliding"]
    size: int = Field(ge=1, description="steps in the window")
    mode: Literal["progressive", "random", "decay"] = Field("progressive", description="how the window moves")
    shift_interval: int = Field(25, ge=1, description="iterations between shifts (progressive, decay)")
    stride: int = Field(1, ge=1, description="steps moved per shift (progressive, decay)")
    decay_rate: float = Field(0.8, gt=0, le=1, description="decay mode: j-th interval = shift_interval * rate**j")
    min_shift_interval: int = Field(1, ge=1, description="decay mode: shortest interval")
    roll_back: bool = Field(False, description="restart at step 0 after the last position instead of staying")

    def _inactive(self) -> dict[str, str]:
        off = {}
        if self.mode != "decay":
            off |= {k: "to mode: decay" for k in ("decay_rate", "min_shift_interval")}
        if self.mode == "random":
            off |= {k: "to modes progressive and decay" for k in ("shift_interval", "stride", "roll_back")}
        return off


WindowConfig = Annotated[AllStepsWindow | OneRandomStepWindow | SlidingWindowConfig, Field(discriminator="type")]


class MDPConfig(_Strict):
    converter: ConverterConfig = Field(
        default_factory=lambda: NoiseNetConverter(type="reinflow"),
        description="stochastic transition of a denoising step",
    )
    window: WindowConfig = Field(
        default_factory=lambda: AllStepsWindow(type="all"), description="which denoising steps are stochastic"
    )
    solver: Literal["euler", "heun", "dpm_solver_2m"] = Field(
        "euler", description="deterministic solver outside the window (and for evaluation): euler, heun, dpm_solver_2m"
    )
    steps_after_window: int | None = Field(
        None,
        ge=1,
        description="MixGRPO-Flash: integrate the steps after a sliding window in this many (larger) steps; "
        "null = the grid's steps",
    )
    sample_unit: Literal["chain", "step"] = Field(
        "chain",
        description="one policy-gradient sample per chain (joint log-prob: ReinFlow, Flow-Noise) or per stochastic "
        "denoising step (one clipped ratio per step: DPPO, Flow-GRPO, MixGRPO)",
    )
    log_prob_reduce: Literal["sum", "mean"] = Field(
        "mean", description="log-probs summed over dims (and steps), or their mean per dimension (and step)"
    )

    @model_validator(mode="after")
    def _flash(self) -> MDPConfig:
        if self.steps_after_window is not None and not isinstance(self.window, SlidingWindowConfig):
            raise ValueError(
                f"steps_after_window needs window.type: sliding (window {self.window.type!r} leaves no batch-wide "
                "steps after it to compress); remove it or use a sliding window"
            )
        return self


# --------------------------------------------------------------------------- pretraining
class DemosConfig(_Strict):
    path: str | None = Field(
        None, description="demonstration .npz (observations, actions, episode_ends); null = env's scripted demos"
    )
    episodes: int = Field(200, ge=1, description="scripted episodes to generate (only when path is null)")

    def _inactive(self) -> dict[str, str]:
        return {} if self.path is None else {"episodes": "to scripted demos (path: null)"}


class DispersiveConfig(_Strict):
    """DM1's dispersive regulariser (Wang & He's Dispersive Loss): spreads apart the hidden
    activations of the velocity MLP within each batch (flowrl.core.dispersive)."""

    weight: float | None = Field(
        None, ge=0, description="weight of the dispersive loss added to the flow loss; 0 or null = off"
    )
    variant: Literal["infonce_l2", "infonce_cosine", "hinge", "covariance"] = Field(
        "infonce_l2",
        description="infonce_l2 / infonce_cosine: log-mean-exp of -distance / temperature over the batch's pairs; "
        "hinge: squared hinge on pair distances below margin; covariance: squared off-diagonal covariance",
    )
    layers: list[int] = Field(
        [-1],
        min_length=1,
        description="hidden layers whose activations are dispersed (indices into policy.hidden_dims, negative "
        "from the last); the loss is their mean",
    )
    temperature: float = Field(0.5, gt=0, description="tau of the InfoNCE variants")
    margin: float = Field(1.0, gt=0, description="hinge: pairs with squared distance per feature below it repel")

    def _inactive(self) -> dict[str, str]:
        off = {}
        if self.variant not in ("infonce_l2", "infonce_cosine"):
            off["temperature"] = "to variant infonce_l2 or infonce_cosine"
        if self.variant != "hinge":
            off["margin"] = "to variant: hinge"
        return off

    @model_validator(mode="after")
    def _distinct_layers(self) -> DispersiveConfig:
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"dispersive.layers lists a layer twice ({self.layers}); list each once")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.weight)


class PretrainConfig(_Strict):
    """Behaviour cloning of the policy family named by policy.type."""

    demos: DemosConfig = Field(default_factory=DemosConfig)
    dispersive: DispersiveConfig = Field(
        default_factory=DispersiveConfig,
        description="flow policies: dispersive regularisation of the network's hidden activations (off by default)",
    )
    consistency_fraction: float = Field(
        0.25,
        gt=0,
        lt=1,
        description="shortcut / meanflow: share of each batch trained on steps of non-zero size (self-consistency "
        "or average-velocity targets); the rest learns flow matching",
    )
    steps: int = Field(3000, ge=1, description="gradient steps of flow-matching behaviour cloning")
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    ema_decay: float = Field(0.995, ge=0, lt=1, description="EMA of the weights; the EMA copy is saved")
    checkpoint_every: int = Field(
        500, ge=1, description="gradient steps between pretraining checkpoints (a killed pretraining resumes there)"
    )


class EvalConfig(_Strict):
    episodes: int = Field(
        64,
        ge=1,
        description="episodes per evaluation (deterministic ODE policy); env.type shapes: held-out prompts, each "
        "drawn env.group_size times",
    )
    every: int = Field(5, ge=1, description="evaluate every this many iterations (and before and after)")
    keep_envs: bool = Field(
        True,
        description="gym envs: make the evaluation's envs at the first evaluation and reset them (same seeds, same "
        "episodes) at the next ones; false = make and close them at every evaluation: for an env whose episodes "
        "depend on more than its reset's seed, or to free memory between evaluations (a ManiSkill env holds ~30 MB "
        "and takes ~0.5 s to make, 0.2 s to close)",
    )


# Keys that moved, and where to (an old file gets one line per key).
MOVED = {
    "ppo": "algo (with algo.type: ppo; the same keys)",
    "ray.num_workers": "env.num_workers (the number of env workers, with or without Ray)",
}


class ExperimentConfig(_Strict):
    name: str = Field(description="experiment name; the run folder starts with it")
    seed: int = Field(
        0,
        ge=0,
        lt=2**32,
        description="seed of everything random (torch, numpy, the envs, the workers); 0 <= seed < 2**32, the range "
        "numpy's seeding takes",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="learner device; auto = cuda when present")
    runs_dir: str = Field("runs", description="parent folder of run folders")
    checkpoint_every: int = Field(5, ge=1, description="iterations between checkpoints")
    env: EnvConfig = Field(default_factory=GymEnvConfig)
    policy: PolicyConfig = Field(default_factory=FlowPolicyConfig)
    mdp: MDPConfig = Field(default_factory=MDPConfig)
    pretrain: PretrainConfig | None = Field(
        default_factory=PretrainConfig,
        description="behaviour cloning before fine-tuning; null = start from random weights (policy from scratch)",
    )
    algo: AlgoConfig = Field(default_factory=lambda: PPOConfig(type="ppo"), description="ppo, grpo or ac_flow")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        problems = self._image_problems()
        image = self.policy.type in IMAGE_POLICY_TYPES
        if not image and self.policy.obs_norm == "dataset" and self.pretrain is None and self.policy.pretrained is None:
            problems.append(
                "policy.obs_norm: dataset needs demonstrations (pretrain) or policy.pretrained; a policy trained "
                "from scratch (pretrain: null) uses policy.obs_norm: running or none"
            )
        grouped = self.algo.type in GROUP_ALGOS
        if grouped and self.env.group_size < 2:
            problems.append(
                f"algo.type: {self.algo.type} needs env.group_size >= 2 (envs per group sharing a reset state)"
            )
        if not grouped and isinstance(self.env, GymEnvConfig) and self.env.group_size > 1:
            problems.append(f"env.group_size only applies to algo.type: {_either(GROUP_ALGOS)}; remove it")
        if self.algo.type in LIKELIHOOD_FREE_ALGOS and self.policy.type not in ("rectified_flow", *IMAGE_POLICY_TYPES):
            problems.append(
                f"algo.type: {self.algo.type} trains a plain velocity field with flow matching: it needs policy.type "
                f"rectified_flow or text_image (got {self.policy.type})"
            )
        window = self.mdp.window
        if self.policy.type in FLOW_TYPES or image:
            k = self.policy.denoising_steps
            if isinstance(window, SlidingWindowConfig) and window.size > k:
                problems.append(
                    f"mdp.window.size={window.size} is larger than policy.denoising_steps={k}; "
                    "a window holds at most K steps"
                )
            if self.mdp.solver != "euler" and self.policy.type not in ("rectified_flow", *IMAGE_POLICY_TYPES):
                problems.append(
                    f"mdp.solver: {self.mdp.solver} needs a plain velocity field (policy.type: rectified_flow); "
                    f"{self.policy.type} policies predict average velocities over their own steps: use euler"
                )
        if isinstance(self.algo, ACFlowConfig):
            problems += self._ac_flow_problems()
        if self.pretrain is not None and self.policy.type in FLOW_TYPES:
            depth = len(self.policy.hidden_dims)
            wrong = [i for i in self.pretrain.dispersive.layers if not -depth <= i < depth]
            if wrong:
                problems.append(
                    f"pretrain.dispersive.layers {wrong} outside the {depth} hidden layers of policy.hidden_dims; "
                    f"use indices {-depth}..{depth - 1}"
                )
        if isinstance(self.algo, PPOConfig) and isinstance(self.env, GymEnvConfig):
            batch = self.env.num_envs * self.algo.steps_per_iteration
            if self.algo.minibatch_size > batch:
                problems.append(
                    f"algo.minibatch_size={self.algo.minibatch_size} is larger than the batch of env.num_envs x "
                    f"algo.steps_per_iteration = {batch}; lower it"
                )
        problems += self._learner_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _ac_flow_problems(self) -> list[str]:
        """AC-Flow regresses a plain velocity field and trains no noise net."""
        problems = []
        if self.policy.type not in ("rectified_flow", *IMAGE_POLICY_TYPES):
            problems.append(
                f"algo.type: ac_flow fine-tunes a velocity field by flow matching: it needs policy.type: "
                f"rectified_flow (got {self.policy.type})"
            )
        elif isinstance(self.mdp.converter, NoiseNetConverter):
            problems.append(
                f"algo.type: ac_flow trains no noise net (mdp.converter.type: {self.mdp.converter.type}); explore "
                "with a fixed noise: mdp.converter.type flow_sde or cps"
            )
        return problems

    def _learner_problems(self) -> list[str]:
        """A data-parallel learner needs Ray, and minibatches that split into equal shares."""
        n = self.learner.num_workers
        if n == 1:
            return []
        problems = []
        if not isinstance(self.algo, PPOConfig | GRPOConfig):
            problems.append(
                f"learner.num_workers={n}: the data-parallel learner runs ppo and grpo, not {self.algo.type}; use "
                "learner.num_workers: 1"
            )
        if not self.ray.enabled:
            problems.append(f"learner.num_workers={n} runs the learner ranks as Ray actors: set ray.enabled: true")
        if self.algo.minibatch_size % n:
            problems.append(
                f"algo.minibatch_size={self.algo.minibatch_size} must be a multiple of learner.num_workers={n} "
                "(each rank takes an equal share of every minibatch)"
            )
        if isinstance(self.algo, PPOConfig) and self.algo.w2_coef > 0:
            problems.append(
                f"algo.w2_coef draws one noise per minibatch row; learner.num_workers={n} does not split it yet: "
                "use learner.num_workers: 1 with the W2 regulariser"
            )
        return problems

    def _image_problems(self) -> list[str]:
        """The image track's rules: shapes <-> text_image, GRPO, converters without a noise net."""
        shapes, image = self.env.type == "shapes", self.policy.type in IMAGE_POLICY_TYPES
        if shapes != image:
            return [
                "env.type: shapes needs policy.type: text_image or sd3"
                if shapes
                else f"policy.type: {self.policy.type} needs env.type: shapes"
            ]
        if not shapes:
            return []
        problems = []
        image_algos = (*GROUP_ALGOS, "ac_flow")
        if self.algo.type not in image_algos:
            problems.append(
                f"env.type: shapes needs algo.type: {_either(image_algos)} (got {self.algo.type}): images have no "
                "env steps"
            )
        if isinstance(self.mdp.converter, NoiseNetConverter) and self.algo.type not in LIKELIHOOD_FREE_ALGOS:
            problems.append(
                f"mdp.converter.type: {self.mdp.converter.type} has a noise net on observations; text_image "
                "policies use flow_sde or cps (set mdp.converter.type)"
            )
        if self.env.reward.get("advantages") == "per_reward" and getattr(self.algo, "outcome", "return") != "return":
            problems.append(
                "env.reward.advantages: per_reward normalises each reward's scores within a group; it needs "
                "algo.outcome: return"
            )
        if self.env.reward.get("advantages") == "per_reward" and isinstance(self.algo, GRPOConfig):
            if self.algo.advantages.std == "global":
                problems.append(
                    "env.reward.advantages: per_reward normalises each reward within its group; it takes no "
                    "algo.advantages.std: global (remove one of them)"
                )
        if self.policy.type == "sd3":
            if self.pretrain is not None:
                problems.append("policy.type: sd3 is fine-tuned from its folder's weights: set pretrain: null")
            return problems
        patch = 4 * self.policy.patch
        if self.env.image_size % patch:
            problems.append(f"env.image_size={self.env.image_size} must be a multiple of 4 * policy.patch = {patch}")
        return problems

    def _dead_paths(self) -> dict[str, str]:
        """Keys of one section that do nothing because of another section."""
        dead: dict[str, str] = {}
        family = self.policy.type
        learned_noise = family in FLOW_TYPES and isinstance(self.mdp.converter, NoiseNetConverter)
        if family not in (*FLOW_TYPES, *IMAGE_POLICY_TYPES):
            dead["mdp"] = "to flow policies (policy.type rectified_flow, shortcut, meanflow or text_image)"
        elif self.algo.type in LIKELIHOOD_FREE_ALGOS:  # they sample with the ODE (mdp.solver) and store no steps
            why = f"to algorithms with log-probs (ppo, grpo); algo.type {self.algo.type} samples with the ODE"
            dead |= {f"mdp.{k}": why for k in ("converter", "window", "steps_after_window", "sample_unit")}
            dead["mdp.log_prob_reduce"] = why
        if not learned_noise:
            dead["algo.noise_lr"] = "to a learned noise (flow policies with mdp.converter.type reinflow or flow_noise)"
        if not (learned_noise or family == "gaussian"):
            dead["algo.entropy_coef"] = "to a learned std (reinflow / flow_noise converters, gaussian policies)"
        flow = family in (*FLOW_TYPES, *IMAGE_POLICY_TYPES)
        if not (flow and not isinstance(self.mdp.converter, NoiseNetConverter)):
            dead["algo.ratio_norm"] = "to flow policies with a fixed-std converter (mdp.converter.type flow_sde or cps)"
        if family not in ("shortcut", "meanflow"):
            dead["pretrain.consistency_fraction"] = "to policy.type shortcut or meanflow"
        if family not in FLOW_TYPES:
            dead["pretrain.dispersive"] = "to flow policies (policy.type rectified_flow, shortcut or meanflow)"
        if family in IMAGE_POLICY_TYPES:
            dead["pretrain.demos"] = "to gym envs (text_image pretraining draws pairs from the shapes world)"
        if getattr(self.policy, "cfg_scale", None) == 1.0:
            dead["policy.detach_uncond"] = "to classifier-free guidance (policy.cfg_scale other than 1)"
        if self.env.type == "shapes":
            dead["algo.max_steps"] = "to gym envs (an image is one step)"
            dead["algo.gamma"] = "to gym envs (an image is one step)"
            dead["ray.cpus_per_worker"] = "to gym env workers (reward workers reserve no CPU)"
            dead["eval.keep_envs"] = "to gym envs (an image evaluation has no envs to keep)"
        return dead

    def _was_set(self, dotted: str) -> bool:
        node: Any = self
        for part in dotted.split("."):
            if not isinstance(node, BaseModel) or part not in node.model_fields_set:
                return False
            node = getattr(node, part)
        return True

    @model_validator(mode="after")
    def _no_dead_paths(self) -> ExperimentConfig:
        unused = {k: why for k, why in self._dead_paths().items() if self._was_set(k)}
        if unused:
            raise ValueError(
                "; ".join(f"{k} only applies {why}; remove it (on the command line: ~{k})" for k, why in unused.items())
            )
        return self

    @model_serializer(mode="wrap")
    def _drop_inactive(self, handler):
        data = handler(self)
        for dotted in self._dead_paths():
            *parents, last = dotted.split(".")
            node = data
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(last, None)
        return data
