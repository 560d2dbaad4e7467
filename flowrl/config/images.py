"""Config sections of the image track: the shapes world (``env.type: shapes``) and the
text-conditioned image flow (``policy.type: text_image``). The cross-section rules (shapes
needs text_image and GRPO, Flow-SDE or CPS steps, ...) are in ``ExperimentConfig``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from flowrl.config.base import _Strict
from flowrl.errors import ConfigError


class ShapesEnvConfig(_Strict):
    """The shapes world as a prompt environment: every iteration draws prompts, the policy
    draws ``group_size`` images of each, a reward model scores them (RewardPool workers)."""

    type: Literal["shapes"] = Field(description="env family: shapes (text-to-image, envs/shapes)")
    image_size: int = Field(32, ge=8, description="image side in pixels (the network's and the reward's)")
    benchmark: Literal["geneval", "zero_shot"] = Field(
        "geneval",
        description="the split of the shapes benchmark (envs/shapes/captions.py): geneval = pretraining sees every "
        "caption, RL never prompts for the held-out strings, GenEval's category mix; zero_shot = held-out "
        "colour-shape pairs, counts and arrangements never seen in pretraining or training",
    )
    prompt_split: Literal["train", "heldout"] = Field(
        "train",
        description="captions of the benchmark split the training prompts are drawn from (evaluation reports both)",
    )
    prompts_per_iteration: int = Field(8, ge=1, description="prompts drawn per iteration (one group each)")
    group_size: int = Field(4, ge=1, description="images per prompt (a GRPO group)")
    same_noise: bool = Field(False, description="the images of a group start from the same initial noise")
    prompts_per_chunk: int = Field(
        4,
        ge=1,
        description="prompts sampled together and sent to the reward workers as one batch; a chunk is scored "
        "while the next one is sampled",
    )
    reward: dict[str, Any] = Field(
        {"type": "verifier"},
        description="reward spec: a registered type and its keys (the types: flowrl.rewards.registry.reward_types(), "
        "README 'Adding a reward model'), or MODULE:NAME / FILE.py:NAME for a reward of your own; validated here, "
        "built in the reward workers",
    )
    reward_workers: int = Field(1, ge=1, description="reward workers (Ray actors; in-process when ray.enabled: false)")

    @property
    def id(self) -> str:
        """The env's name in messages (gym envs have a gymnasium id)."""
        return "shapes"

    @field_validator("reward")
    @classmethod
    def _reward_spec(cls, spec: dict[str, Any]) -> dict[str, Any]:
        """The spec's keys checked against its registered type; nothing is built or loaded here
        (a learned reward's checkpoint is checked by the preflight, ``registry.check_reward``)."""
        from flowrl.rewards.registry import spec_of  # lazily: the registry imports torch

        try:
            spec_of(spec, "reward")
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("reward.").removeprefix("reward: ")) from None
        return spec


class TextImagePolicyConfig(_Strict):
    """TextImageVelocity (flowrl/models/text_image.py) on pixels in [-1, 1], made into an MDP
    by ``mdp`` (flow_sde or cps converter, window, solver)."""

    type: Literal["text_image"] = Field(description="text-conditioned image flow (the shapes world)")
    channels: list[int] = Field(
        [32, 64, 64], min_length=3, max_length=3, description="U-Net widths at full, half and quarter resolution"
    )
    patch: int = Field(2, ge=1, description="patch size of the stem (env.image_size must divide by 4 * patch)")
    text_dim: int = Field(64, ge=8, description="caption encoder width (a multiple of 4: 4 attention heads)")
    time_dim: int = Field(64, ge=2, description="sinusoidal time-embedding size (even)")
    denoising_steps: int = Field(10, ge=1, description="K, sampling steps in training (the MDP's steps)")
    eval_denoising_steps: int = Field(20, ge=1, description="ODE steps of evaluation (and of the sample grids)")
    time_shift: float = Field(
        1.0, gt=0, description="SD3-style time-grid shift; 1 = uniform grid, > 1 = more steps near the noise end"
    )
    cfg_scale: float = Field(
        1.0, ge=0, description="classifier-free guidance in sampling, training and evaluation; 1 = no guidance"
    )
    detach_uncond: bool = Field(
        False,
        description="fine-tuning: no gradient through the unconditional branch of classifier-free guidance (its "
        "weight 1 - cfg_scale would push every prompt's shared unconditional field); sampling is unchanged",
    )
    freeze_text: bool = Field(
        False,
        description="fine-tuning: keep the caption encoder (word and position embeddings, its transformer) fixed, "
        "as Flow-GRPO keeps SD3's text encoders; pretraining trains it either way",
    )
    caption_dropout: float = Field(
        0.1, ge=0, lt=1, description="pretraining: share of captions replaced by the empty one (learns the CFG field)"
    )
    pretrained: str | None = Field(
        None, description="checkpoint of a pretrained network; null = pretrain from `pretrain` first"
    )

    @field_validator("channels")
    @classmethod
    def _groups(cls, channels: list[int]) -> list[int]:
        bad = [c for c in channels if c < 8 or c % 8]
        if bad:
            raise ValueError(f"every width must be a positive multiple of 8 (GroupNorm of 8 groups), got {channels}")
        return channels

    @field_validator("text_dim")
    @classmethod
    def _heads(cls, dim: int) -> int:
        if dim % 4:
            raise ValueError(f"text_dim must be a multiple of 4 (4 attention heads), got {dim}")
        return dim


# Flow-GRPO's LoRA targets: every projection of SD3's joint attention (image and text streams).
LORA_TARGETS = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)


class LoRAConfig(_Strict):
    """peft LoRA on the SD3 transformer (the only trained weights)."""

    rank: int = Field(32, ge=1, description="LoRA rank r (Flow-GRPO: 32)")
    alpha: float = Field(64.0, gt=0, description="LoRA alpha; the adapter's scale is alpha / rank (Flow-GRPO: 64)")
    targets: list[str] = Field(
        list(LORA_TARGETS),
        min_length=1,
        description="names (suffixes) of the transformer's modules that get an adapter; default: every projection "
        "of the joint attention, as Flow-GRPO",
    )


class SD3PolicyConfig(_Strict):
    """diffusers' Stable Diffusion 3 from a local folder (flowrl/models/sd3_policy.py): its transformer,
    trained by a LoRA, is the velocity field; its VAE decodes; its text encoders embed every prompt once."""

    type: Literal["sd3"] = Field(description="Stable Diffusion 3 (diffusers folder) with a peft LoRA")
    path: str = Field(description="local diffusers SD3 folder (model_index.json, transformer/, vae/, text encoders)")
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    denoising_steps: int = Field(10, ge=1, description="K, sampling steps in training (the MDP's steps)")
    eval_denoising_steps: int = Field(40, ge=1, description="ODE steps of evaluation (and of the sample grids)")
    time_shift: float | None = Field(
        None, gt=0, description="the scheduler's time shift; null = the folder's scheduler config (SD3.5: 3.0)"
    )
    cfg_scale: float = Field(4.5, ge=0, description="classifier-free guidance (Flow-GRPO on SD3.5: 4.5); 1 = none")
    max_sequence_length: int = Field(128, ge=1, description="T5 tokens per prompt (Flow-GRPO: 128)")
    mixed_precision: Literal["no", "bf16"] = Field(
        "no", description="bf16 autocast of the transformer on CUDA (ignored on the CPU); untested here"
    )
    gradient_checkpointing: bool = Field(False, description="recompute the transformer's activations in backward")
    pretrained: str | None = Field(
        None, description="LoRA weights to start from (.safetensors written by flowrl); null = a fresh adapter"
    )
