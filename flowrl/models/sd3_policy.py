"""SD3Policy: diffusers' Stable Diffusion 3 transformer as a flowrl image policy, trained by LoRA.

The velocity field is ``SD3Transformer2DModel`` from a local diffusers folder (the layout
``StableDiffusion3Pipeline.save_pretrained`` writes). diffusers works in the noise-level
convention: ``x_sigma = (1 - sigma) x0 + sigma eps``, the transformer gets
``timestep = 1000 sigma`` and predicts ``v_sigma = eps - x0``. flowrl's time is
``t = 1 - sigma`` with ``v_t = x0 - eps = -v_sigma`` (flowrl/core/grids.py), so
``x + (t' - t) v_t = x + (sigma' - sigma) v_sigma``: flowrl's Euler step is
``FlowMatchEulerDiscreteScheduler.step``. The time grid is the folder's scheduler's
(``set_timesteps(K)``, its shift), so sampling matches the plain diffusers pipeline.

Events are latents ``[C, H/f, W/f]``; ``sample``, ``act`` and ``images_from`` return images
decoded by the folder's VAE, in [-1, 1] like the shapes world's policy, so rewards and the
evaluator see pixels. Prompt embeddings of every caption the env can send are computed once
with the folder's three text encoders; the encoders are then dropped.

LoRA (peft, through diffusers' ``add_adapter``) on the transformer's attention projections is
the only trainable part. The KL reference is the same transformer with the adapter disabled
(``frozen_reference``), not a second copy. ``state_dict`` holds the LoRA tensors only, so the
trainer's checkpoints are LoRA-only; ``save_lora`` / ``load_lora`` write and read them as
safetensors, ``export_lora`` writes a folder ``StableDiffusion3Pipeline.load_lora_weights``
reads.
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowrl.config.images import LORA_TARGETS
from flowrl.core.transitions import Reduce, SampleUnit, Transitions
from flowrl.errors import CheckpointError, FlowRLError
from flowrl.models.flow_policy import FlowPolicy
from flowrl.models.policy import Evaluation
from flowrl.models.sampler import ChainSampler

_SUBFOLDERS = ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class LoRASpec:
    """peft LoRA on the transformer: rank, alpha (scale alpha / rank) and the module names."""

    rank: int = 32
    alpha: float = 64.0
    targets: tuple[str, ...] = LORA_TARGETS  # Flow-GRPO's: every projection of the joint attention

    def metadata(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def check_sd3_folder(path: str | Path) -> Path:
    """A local diffusers SD3 folder, or a one-line FlowRLError naming what is wrong."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FlowRLError(
            f"SD3 model folder not found: {folder} (policy.path); download a Stable Diffusion 3 diffusers folder "
            "(e.g. SD3.5-Medium) to this machine and point policy.path at it"
        )
    index = folder / "model_index.json"
    try:
        cls = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError):
        cls = None
    missing = [s for s in _SUBFOLDERS if not (folder / s).is_dir()]
    if cls != "StableDiffusion3Pipeline" or missing:
        what = f"its model_index.json names {cls!r}" if cls else "it has no readable model_index.json"
        lacking = f" and it lacks {', '.join(missing)}" if missing else ""
        raise FlowRLError(
            f"{folder} is not a diffusers Stable Diffusion 3 folder ({what}{lacking}); policy.path needs the "
            "folder StableDiffusion3Pipeline.save_pretrained writes (model_index.json, transformer/, vae/, ...)"
        )
    return folder


@torch.no_grad()
def encode_prompts(folder: Path, prompts: Sequence[str], max_sequence_length: int) -> tuple[Tensor, Tensor]:
    """``(embeds [P, L, D], pooled [P, Dp])`` of ``prompts`` by the folder's three text encoders
    (the pipeline's own ``encode_prompt``; on CUDA when there is one), returned on the CPU in
    float32; the encoders are freed."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, transformer=None, vae=None)
    if torch.cuda.is_available():  # T5-XXL on the CPU takes minutes for a few hundred prompts
        pipe.to("cuda")
    embeds, pooled = [], []
    for i in range(0, len(prompts), 32):
        chunk = list(prompts[i : i + 32])
        e, _, p, _ = pipe.encode_prompt(
            chunk, None, None, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length
        )
        embeds.append(e.float().cpu())
        pooled.append(p.float().cpu())
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return torch.cat(embeds), torch.cat(pooled)


class PromptTable(nn.Module):
    """Cached prompt embeddings, looked up by the condition rows the env sends (e.g. the shapes
    world's caption token ids ``[B, L]``). Row 0 of ``keys`` must be the empty caption's (CFG's
    unconditional input). Buffers are not persistent: checkpoints never hold them."""

    def __init__(self, keys: Tensor, embeds: Tensor, pooled: Tensor, prompts: Sequence[str]) -> None:
        super().__init__()
        self.index = {tuple(row): i for i, row in enumerate(keys.tolist())}
        self.prompts = list(prompts)
        self.register_buffer("embeds", embeds, persistent=False)
        self.register_buffer("pooled", pooled, persistent=False)

    def rows(self, cond: Tensor) -> Tensor:
        try:
            rows = [self.index[tuple(r)] for r in cond.tolist()]
        except KeyError as exc:
            raise ValueError(f"condition row {list(exc.args[0])} is not a cached prompt") from None
        return torch.tensor(rows, device=self.embeds.device)

    def forward(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        rows = self.rows(cond)
        return self.embeds[rows], self.pooled[rows]


class SD3Velocity(nn.Module):
    """``v(cond, x, t)`` in flowrl's convention from diffusers' SD3 transformer, with CFG.

    cond: ``[B, L]`` condition rows (PromptTable keys); x: latents ``[B, C, h, w]``; t: scalar
    or ``[B]``. ``autocast``: bf16 autocast on CUDA (untested here)."""

    def __init__(self, transformer: nn.Module, prompts: PromptTable, cfg_scale: float, autocast: bool) -> None:
        super().__init__()
        self.transformer, self.prompts = transformer, prompts
        self.cfg_scale, self.autocast = cfg_scale, autocast

    def forward(self, cond: Tensor, x: Tensor, t: Tensor | float, t_next: Tensor | float | None = None) -> Tensor:
        b = x.shape[0]
        t_b = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(b)
        embeds, pooled = self.prompts(cond)
        if self.cfg_scale != 1.0:  # the empty caption (row 0) as the unconditional branch
            embeds = torch.cat([embeds, self.prompts.embeds[:1].expand_as(embeds)])
            pooled = torch.cat([pooled, self.prompts.pooled[:1].expand_as(pooled)])
            x_in, t_in = torch.cat([x, x]), torch.cat([t_b, t_b])
        else:
            x_in, t_in = x, t_b
        enabled = self.autocast and x.device.type == "cuda"
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=enabled):
            v_sigma = self.transformer(
                hidden_states=x_in,
                timestep=(1.0 - t_in) * 1000.0,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        v = -v_sigma.float()  # v_t = -v_sigma
        if self.cfg_scale == 1.0:
            return v
        v_cond, v_uncond = v[:b], v[b:]
        return v_uncond + self.cfg_scale * (v_cond - v_uncond)


def scheduler_grid(folder: Path, num_steps: int, shift: float | None) -> Tensor:
    """flowrl's grid ``t = 1 - sigma`` ``[K + 1]`` from the folder's FlowMatchEulerDiscreteScheduler
    (``set_timesteps(K)``; ``shift`` replaces its shift when given)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    if shift is not None:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, shift=shift)
    scheduler.set_timesteps(num_steps)
    grid = 1.0 - scheduler.sigmas.double()
    grid[0], grid[-1] = 0.0, 1.0
    return grid.float()


class SD3Policy(FlowPolicy):
    """A FlowPolicy whose velocity is ``SD3Velocity`` (LoRA-adapted transformer) and whose
    samples end in VAE-decoded images; see the module doc."""

    def __init__(
        self,
        velocity: SD3Velocity,
        vae: nn.Module,
        sampler: ChainSampler,
        eval_sampler: ChainSampler,
        lora: LoRASpec,
        sample_unit: SampleUnit = "step",
        log_prob_reduce: Reduce = "mean",
        latent_shape: tuple[int, int, int] = (16, 64, 64),
    ) -> None:
        super().__init__(velocity, sampler, sample_unit, log_prob_reduce)  # type: ignore[arg-type]
        self.vae, self.eval_sampler, self.lora = vae.requires_grad_(False), eval_sampler, lora
        self.latent_shape = latent_shape

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self.latent_shape

    @property
    def transformer(self) -> nn.Module:
        return self.velocity.transformer

    @property
    def network(self) -> SD3Policy:  # type: ignore[override]
        """What checkpoints store: this policy, whose ``state_dict`` is the LoRA tensors."""
        return self

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.transformer.named_parameters() if "lora_" in n}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"actor": list(self.lora_parameters().values())}

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        """The LoRA tensors only (the base model is the folder's, never copied into a checkpoint)."""
        return {n: p.detach() for n, p in self.lora_parameters().items()}

    def load_state_dict(self, state: dict[str, Tensor], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        params = self.lora_parameters()
        if set(state) != set(params):
            extra, missing = sorted(set(state) - set(params)), sorted(set(params) - set(state))
            raise RuntimeError(f"LoRA tensors do not fit: missing {missing[:2]}, unexpected {extra[:2]}")
        with torch.no_grad():
            for name, p in params.items():
                if state[name].shape != p.shape:
                    raise RuntimeError(f"LoRA tensor {name} has shape {list(state[name].shape)}, needs {list(p.shape)}")
                p.copy_(state[name])
        return None

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """The base model: the LoRA adapter off inside the block."""
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    def frozen_reference(self) -> AdapterOffReference:
        """The KL reference: this policy with its adapter disabled (no copy)."""
        return AdapterOffReference(self)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B, C, h, w]`` -> images ``[B, 3, H, W]`` in [-1, 1] (float32)."""
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        z = latents.to(next(self.vae.parameters()).dtype) / cfg.scaling_factor + shift
        return self.vae.decode(z, return_dict=False)[0].float().clamp(-1.0, 1.0)

    @torch.no_grad()
    def sample(
        self, cond: Tensor, iteration: int = 0, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> Transitions:
        chains = super().sample(cond, iteration, generator, noise)
        chains.final = self.decode(chains.final)
        return chains

    def _latent_noise(self, noise: Tensor) -> Tensor:
        """Latent noise ``[B, *E]`` from the given noise (e.g. the evaluator's pixel-shaped
        draw): its first prod(E) entries per row, still i.i.d. N(0, 1), so evaluations keep
        their common random numbers."""
        need = int(torch.tensor(self.event_shape).prod())
        flat = noise.flatten(1)
        if flat.shape[1] < need:
            raise ValueError(f"noise of shape {tuple(noise.shape)} has fewer than {need} entries per row")
        return flat[:, :need].reshape(noise.shape[0], *self.event_shape)

    @torch.no_grad()
    def act(self, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn((cond.shape[0], *self.event_shape), generator=generator, device=cond.device)
        return self.images_from(cond, noise)

    @torch.no_grad()
    def images_from(self, cond: Tensor, noise: Tensor) -> Tensor:
        """Evaluation images ``[B, 3, H, W]`` in [-1, 1]: the ODE on the evaluation grid, decoded."""
        return self.decode(self.eval_sampler.ode(self.velocity, cond, self._latent_noise(noise))[0])

    def coupled_actions(self, cond: Tensor, noise: Tensor) -> Tensor:
        return self.sampler.ode(self.velocity, cond, self._latent_noise(noise))[0]

    def save_lora(self, path: str | Path) -> None:
        """The LoRA tensors and their spec as one safetensors file."""
        from safetensors.torch import save_file

        state = {n: t.detach().cpu().contiguous() for n, t in self.state_dict().items()}
        save_file(state, str(path), metadata={"flowrl_lora": json.dumps(self.lora.metadata())})

    def load_lora(self, path: str | Path) -> None:
        """Resume LoRA tensors written by ``save_lora``; CheckpointError (one line) when the file
        is missing, unreadable or of another LoRA spec."""
        from safetensors import safe_open

        path = Path(path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"LoRA file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("flowrl_lora", "null"))
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
            raise CheckpointError(f"{path} is not a readable safetensors file ({type(exc).__name__})") from None
        if meta != self.lora.metadata():
            raise CheckpointError(
                f"{path} holds a LoRA of spec {meta}, the experiment's is {self.lora.metadata()}: set policy.lora "
                "to the file's rank, alpha and targets"
            )
        try:
            self.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: {exc}") from None

    def export_lora(self, folder: str | Path) -> Path:
        """A folder with ``pytorch_lora_weights.safetensors`` in diffusers' format: load it into a
        plain pipeline with ``StableDiffusion3Pipeline.load_lora_weights(folder)``."""
        from diffusers import StableDiffusion3Pipeline
        from peft.utils import get_peft_model_state_dict

        layers = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(self.transformer).items()}
        meta = {"r": self.lora.rank, "lora_alpha": self.lora.alpha, "target_modules": list(self.lora.targets)}
        StableDiffusion3Pipeline.save_lora_weights(
            folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=meta
        )
        return Path(folder)


class AdapterOffReference:
    """The reference policy of a LoRA policy: evaluation with the adapter disabled. Nothing to
    checkpoint (the base weights are the model folder's)."""

    def __init__(self, policy: SD3Policy) -> None:
        self.policy = policy

    def evaluate(self, cond: Tensor, sample: Transitions) -> Evaluation:
        with self.policy.adapter_disabled():
            return self.policy.evaluate(cond, sample)

    def coupled_actions(self, cond: Tensor, noise: Tensor) -> Tensor:
        with self.policy.adapter_disabled():
            return self.policy.coupled_actions(cond, noise)

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        return None


def load_sd3_policy(
    path: str | Path,
    prompts: Sequence[str],
    keys: Tensor,
    *,
    image_size: int,
    denoising_steps: int,
    eval_denoising_steps: int,
    sampler_kwargs: dict[str, Any],
    lora: LoRASpec,
    cfg_scale: float = 1.0,
    time_shift: float | None = None,
    max_sequence_length: int = 128,
    mixed_precision: bool = False,
    gradient_checkpointing: bool = False,
    sample_unit: SampleUnit = "step",
    log_prob_reduce: Reduce = "mean",
) -> SD3Policy:
    """An SD3Policy from a local diffusers folder; ``prompts`` (with ``keys`` ``[P, L]``, their
    condition rows; row 0 the empty caption) are encoded once. ``sampler_kwargs``: the
    ChainSampler's converter, window, solver and steps_after_window."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from peft import LoraConfig

    folder = check_sd3_folder(path)
    transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer").requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    patch = transformer.config.patch_size
    if image_size % (factor * patch):
        raise FlowRLError(
            f"env.image_size={image_size} must divide by {factor * patch} (the VAE's factor {factor} x patch {patch})"
        )
    transformer.add_adapter(
        LoraConfig(r=lora.rank, lora_alpha=lora.alpha, init_lora_weights="gaussian", target_modules=list(lora.targets))
    )
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    embeds, pooled = encode_prompts(folder, prompts, max_sequence_length)
    table = PromptTable(keys, embeds, pooled, prompts)
    velocity = SD3Velocity(transformer, table, cfg_scale, mixed_precision)
    sampler = ChainSampler(denoising_steps, **sampler_kwargs)
    sampler.grid = scheduler_grid(folder, denoising_steps, time_shift)
    evaluation = ChainSampler(eval_denoising_steps, solver=sampler_kwargs.get("solver", "euler"))
    evaluation.grid = scheduler_grid(folder, eval_denoising_steps, time_shift)
    latent = (vae.config.latent_channels, image_size // factor, image_size // factor)
    return SD3Policy(velocity, vae, sampler, evaluation, lora, sample_unit, log_prob_reduce, latent)
