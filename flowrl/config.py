"""Experiment configuration: one YAML file = one experiment, validated strictly.

Every field has a type, a default and a description. Unknown keys and wrong types are
errors that name the key and the file. Command-line overrides use ``key.sub=value`` (the
value is parsed as YAML: ``ppo.clip=0.1``, ``policy.hidden_dims=[64,64]``, ``x=null``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from flowrl.errors import FlowRLError


class ConfigError(FlowRLError, ValueError):
    """A bad experiment file or override; the message names the key and the fix."""


class _Strict(BaseModel):
    """Unknown keys are errors; so are keys that have no effect in this configuration."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def _inactive(self) -> dict[str, str]:
        """Fields that do nothing in this configuration -> when they would apply."""
        return {}

    @model_validator(mode="after")
    def _no_dead_keys(self):
        unused = {k: why for k, why in self._inactive().items() if k in self.model_fields_set}
        if unused:
            raise ValueError("; ".join(f"{k} only applies {why}; remove it" for k, why in unused.items()))
        return self

    @model_serializer(mode="wrap")
    def _drop_inactive(self, handler):
        data = handler(self)
        for key in self._inactive():
            data.pop(key, None)
        return data


# --------------------------------------------------------------------------- env
class EnvConfig(_Strict):
    id: str = Field("flowrl/TwoGoal-v0", description="gymnasium id of a task registered by `envs`")
    num_envs: int = Field(16, ge=1, description="parallel envs used to collect rollouts (over all workers)")
    kwargs: dict[str, Any] = Field({}, description="keyword arguments of the env's constructor (gym.make)")


# --------------------------------------------------------------------------- Ray
class RayConfig(_Strict):
    enabled: bool = Field(True, description="env workers as Ray actors; false = the same workers in this process")
    address: str | None = Field(
        None, description="null = start a local Ray; 'auto' or 'HOST:PORT' = join a running cluster"
    )
    num_workers: int = Field(2, ge=1, description="env workers; each owns env.num_envs / num_workers envs")
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


# --------------------------------------------------------------------------- policy
FLOW_TYPES = ("rectified_flow", "shortcut", "meanflow")
PolicyType = Literal["rectified_flow", "shortcut", "meanflow", "diffusion", "gaussian"]


class PolicyConfig(_Strict):
    type: PolicyType = Field(
        "rectified_flow",
        description="policy family: rectified_flow (velocity v(x, t)); shortcut (step-size-conditioned velocity, "
        "self-consistency); meanflow (average velocity u(x, t, t_next), one-step); diffusion (DDPM/DDIM "
        "epsilon model, the DPPO baseline); gaussian (mean MLP + learned std, the Gaussian PPO baseline)",
    )
    horizon: int = Field(4, ge=1, description="action chunk length Ta executed per policy step")
    denoising_steps: int = Field(
        4, ge=1, description="K, integration steps of a flow; sampling steps of a diffusion policy (<= train_steps)"
    )
    time_shift: float = Field(
        1.0, gt=0, description="SD3-style time-grid shift; 1 = uniform grid, > 1 = more steps near the noise end"
    )
    hidden_dims: list[int] = Field([256, 256], min_length=1, description="MLP widths of the policy network")
    time_embed_dim: int = Field(32, ge=2, description="sinusoidal time-embedding size (even)")
    obs_norm: Literal["dataset", "running", "none"] = Field(
        "dataset",
        description="observation normalisation: dataset = mean/std of the demonstrations, frozen (kept from "
        "policy.pretrained when given); running = running estimate over the rollouts (training from scratch); "
        "none",
    )
    train_steps: int = Field(20, ge=1, description="diffusion: DDPM training steps T (cosine schedule)")
    min_std: float = Field(
        0.1, ge=0, description="diffusion: lower bound of every denoising step's std when sampling (DPPO)"
    )
    denoised_clip: float | None = Field(
        1.0, gt=0, description="diffusion: clip of the predicted clean action chunk; null = no clip"
    )
    init_std: float = Field(0.5, gt=0, description="gaussian: initial action std")
    pretrained: str | None = Field(
        None, description="checkpoint of a pretrained policy; null = pretrain from `pretrain` first"
    )

    def _inactive(self) -> dict[str, str]:
        diffusion = {k: "to policy.type: diffusion" for k in ("train_steps", "min_std", "denoised_clip")}
        if self.type in FLOW_TYPES:
            return {**diffusion, "init_std": "to policy.type: gaussian"}
        if self.type == "diffusion":
            return {"time_shift": "to flow policies", "init_std": "to policy.type: gaussian"}
        return {
            **diffusion,
            **{k: "to flow and diffusion policies" for k in ("denoising_steps", "time_shift", "time_embed_dim")},
        }

    @model_validator(mode="after")
    def _diffusion_steps(self) -> PolicyConfig:
        if self.type == "diffusion" and self.denoising_steps > self.train_steps:
            raise ValueError(
                f"denoising_steps={self.denoising_steps} > train_steps={self.train_steps}: a diffusion policy "
                "samples at most its training steps; lower denoising_steps or raise train_steps"
            )
        return self


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
    log_prob_reduce: Literal["sum", "mean"] = Field(
        "mean", description="chain log-prob: sum, or mean per stochastic step and action dimension"
    )


# --------------------------------------------------------------------------- pretraining
class DemosConfig(_Strict):
    path: str | None = Field(
        None, description="demonstration .npz (observations, actions, episode_ends); null = env's scripted demos"
    )
    episodes: int = Field(200, ge=1, description="scripted episodes to generate (only when path is null)")

    def _inactive(self) -> dict[str, str]:
        return {} if self.path is None else {"episodes": "to scripted demos (path: null)"}


class PretrainConfig(_Strict):
    """Behaviour cloning of the policy family named by policy.type."""

    demos: DemosConfig = Field(default_factory=DemosConfig)
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


# --------------------------------------------------------------------------- PPO
class PPOConfig(_Strict):
    iterations: int = Field(50, ge=1)
    steps_per_iteration: int = Field(16, ge=1, description="policy (action-chunk) steps per env per iteration")
    gamma: float = Field(0.99, ge=0, le=1, description="discount per policy step")
    gae_lambda: float = Field(0.95, ge=0, le=1)
    clip: float = Field(0.2, gt=0, description="PPO ratio clip")
    value_clip: float | None = Field(None, gt=0, description="clip of the value update; null = unclipped")
    epochs: int = Field(4, ge=1, description="passes over each rollout")
    minibatch_size: int = Field(256, ge=1)
    actor_lr: float = Field(3e-4, gt=0, description="velocity field learning rate")
    noise_lr: float = Field(3e-4, gt=0, description="noise net learning rate (reinflow / flow_noise)")
    critic_lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "linear"] = Field(
        "constant", description="linear = anneal every learning rate to 0 over the iterations (CleanRL's anneal_lr)"
    )
    entropy_coef: float = Field(0.0, ge=0, description="bonus on the learned steps' entropy")
    critic_warmup_iterations: int = Field(
        0, ge=0, description="first iterations that train only the critic (a fresh critic next to a pretrained actor)"
    )
    max_grad_norm: float = Field(1.0, gt=0)
    target_kl: float | None = Field(None, gt=0, description="stop the epochs early past this approx KL")
    normalize_advantages: bool = True
    normalize_rewards: bool = Field(
        False, description="divide rewards by a running std of the discounted return (for training from scratch)"
    )
    w2_coef: float = Field(
        0.0,
        ge=0,
        description="weight of a W2 regulariser to the initial policy: mean squared distance per action "
        "dimension between both policies' deterministic actions from the same noise; 0 = off",
    )
    ratio_check_tol: float = Field(
        1e-4, gt=0, description="max |ratio - 1| allowed when re-evaluating a fresh rollout before the first update"
    )


class EvalConfig(_Strict):
    episodes: int = Field(64, ge=1, description="episodes per evaluation (deterministic ODE policy)")
    every: int = Field(5, ge=1, description="evaluate every this many iterations (and before and after)")


class ExperimentConfig(_Strict):
    name: str = Field(description="experiment name; the run folder starts with it")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="learner device; auto = cuda when present")
    runs_dir: str = Field("runs", description="parent folder of run folders")
    checkpoint_every: int = Field(5, ge=1, description="iterations between checkpoints")
    env: EnvConfig = Field(default_factory=EnvConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    mdp: MDPConfig = Field(default_factory=MDPConfig)
    pretrain: PretrainConfig | None = Field(
        default_factory=PretrainConfig,
        description="behaviour cloning before fine-tuning; null = start from random weights (policy from scratch)",
    )
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _envs_split_over_workers(self) -> ExperimentConfig:
        if self.env.num_envs % self.ray.num_workers:
            raise ValueError(
                f"env.num_envs={self.env.num_envs} must be a multiple of ray.num_workers={self.ray.num_workers}"
            )
        return self

    @model_validator(mode="after")
    def _obs_norm_source(self) -> ExperimentConfig:
        if self.policy.obs_norm == "dataset" and self.pretrain is None and self.policy.pretrained is None:
            raise ValueError(
                "policy.obs_norm: dataset needs demonstrations (pretrain) or policy.pretrained; a policy trained "
                "from scratch (pretrain: null) uses policy.obs_norm: running or none"
            )
        return self

    def _dead_paths(self) -> dict[str, str]:
        """Keys of one section that do nothing because of another section."""
        dead: dict[str, str] = {}
        family = self.policy.type
        if family not in FLOW_TYPES:
            dead["mdp"] = "to flow policies (policy.type rectified_flow, shortcut or meanflow)"
        if family not in FLOW_TYPES or not isinstance(self.mdp.converter, NoiseNetConverter):
            dead["ppo.noise_lr"] = "to a learned noise (flow policies with mdp.converter.type reinflow or flow_noise)"
        if family == "diffusion" or (family in FLOW_TYPES and not isinstance(self.mdp.converter, NoiseNetConverter)):
            dead["ppo.entropy_coef"] = "to a learned std (reinflow / flow_noise converters, gaussian policies)"
        if family not in ("shortcut", "meanflow"):
            dead["pretrain.consistency_fraction"] = "to policy.type shortcut or meanflow"
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
            raise ValueError("; ".join(f"{k} only applies {why}; remove it" for k, why in unused.items()))
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


# --------------------------------------------------------------------------- loading
def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{'.'.join(keys[: i + 1])}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``'ppo.clip=0.1'`` -> ``('ppo.clip', 0.1)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"bad override {text!r}: expected key.sub=value, e.g. ppo.clip=0.1")
    try:
        return key, yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r} ({exc.problem})") from None


def _dotted_loc(loc: tuple[Any, ...], data: Any) -> str:
    """Error location as the user wrote it: drops pydantic's union tags (e.g. 'reinflow')."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(node, dict) and item in node:
            parts.append(str(item))
            node = node[item]
        elif isinstance(node, dict) and node.get("type") == item:
            continue
        else:
            parts.append(str(item))
            node = None
    return ".".join(parts)


def _section_keys(dotted_parent: str) -> list[str] | None:
    model: Any = ExperimentConfig
    for part in [p for p in dotted_parent.split(".") if p]:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return list(model.model_fields)


def format_validation_error(exc: ValidationError, data: dict[str, Any], source: str, overridden: set[str]) -> str:
    lines = []
    for err in exc.errors():
        key = _dotted_loc(err["loc"], data)
        origin = (
            " (command-line override)"
            if any(key == o or key.startswith(o + ".") or o.startswith(key + ".") for o in overridden)
            else ""
        )
        if err["type"] == "extra_forbidden":
            parent = key.rpartition(".")[0]
            valid = _section_keys(parent)
            hint = f"; valid keys{' in ' + parent if parent else ''}: {', '.join(valid)}" if valid else ""
            lines.append(f"{source}: unknown key '{key}'{origin}{hint}")
        elif err["type"] == "union_tag_not_found":
            lines.append(f"{source}: {key}: missing '{key}.type' (it chooses the kind, e.g. {key}.type=...)")
        elif err["type"] == "union_tag_invalid":
            lines.append(
                f"{source}: {key}.type: {err['ctx']['tag']!r} is not one of {err['ctx']['expected_tags']}{origin}"
            )
        elif err["type"] == "missing":
            lines.append(f"{source}: missing required key '{key}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = f" (got {err['input']!r})" if err["type"] not in ("value_error", "assertion_error") else ""
            section = (
                f"; to replace the whole section instead, give {key}={{...}}"
                if err["type"] == "value_error" and key and any(o.startswith(key + ".") for o in overridden)
                else ""
            )
            lines.append(f"{source}: {key or 'experiment'}: {msg}{got}{origin}{section}")
    return "\n".join(lines)


def build_config(
    data: dict[str, Any], source: str = "<config>", overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Validate a raw dict plus ``key=value`` overrides into an ExperimentConfig."""
    data = dict(data)
    overridden = set()
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
        overridden.add(key)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, data, source, overridden)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load an experiment YAML with overrides; raises ConfigError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return build_config(data, str(path), overrides)


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
