"""The reward registry: a reward model is one file that declares its spec and registers itself.

A spec is a pydantic model (unknown keys are errors) with a ``type`` literal, the reward's
fields and ``build()``; ``@register_reward`` enters it under its ``type``::

    @register_reward
    class BrightnessSpec(RewardSpec):
        \"\"\"Mean pixel value (a toy reward).\"\"\"

        type: Literal["brightness"] = "brightness"

        def build(self) -> BrightnessReward:
            return BrightnessReward()

The shipped rewards are found by importing every module of ``flowrl.rewards`` (pkgutil), so
no list of them is typed out anywhere: ``reward_types()`` is the list, and the one-line errors
(``env.reward.type: 'x' is not one of ...``) come from it. A reward of your own lives in any
file: name it in the config as ``type: MODULE:NAME`` (an importable module, as gymnasium's
``gym.make("module:Env-v0")``) or ``type: path/to/file.py:NAME``; the module is imported (so it
registers itself) wherever the spec is read, the Ray reward workers included.

Three steps, each where it belongs:
- ``spec_of(mapping)``: the validated spec, nothing built (the config validator calls it);
- ``check_reward(mapping)``: the spec's ``preflight()`` before any run folder exists (by
  default it builds the model once; a spec whose model is expensive to build overrides it
  with cheap checks, e.g. the checkpoint is readable);
- ``build_reward(mapping)``: the model, inside the worker that scores with it. A RewardPool
  factory is ``functools.partial(build_reward, spec)``: picklable, so each Ray worker builds
  (and loads) its own model.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pkgutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

from flowrl.errors import ConfigError, FlowRLError
from flowrl.rewards import RewardError, RewardModel

ADDING = "README 'Adding a reward model'"


class RewardSpec(BaseModel):
    """A reward's config: ``type`` (a ``Literal`` with itself as default), its fields, and how
    to build and check it. The class docstring's first line describes the reward in lists."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str

    @property
    def reward_name(self) -> str:
        """The ``name`` the built model reports (a multi reward keys its components by it);
        override when it depends on a field (e.g. ``jpeg_compressibility``)."""
        return self.type

    def build(self) -> RewardModel:
        """The reward model (called inside the worker that scores with it)."""
        raise NotImplementedError(f"{type(self).__name__} must define build()")

    def preflight(self) -> None:
        """Checks before any run folder exists; raise FlowRLError naming the problem and the fix.
        By default the model is built once (and dropped), so a constructor that raises stops
        the command before any work; override with cheap checks when building is expensive."""
        build_reward(self)

    def check_nested(self, where: str) -> None:
        """Checks of the specs inside this one (a multi reward's components); none by default."""

    def per_reward_weights(self) -> dict[str, float] | None:
        """Weights by component name when GRPO takes per-reward advantages; None: advantages
        of the scores."""
        return None


Spec = TypeVar("Spec", bound=type[RewardSpec])
_REGISTRY: dict[tuple[str, str], type[RewardSpec]] = {}  # (module, type) -> spec
_PACKAGE = "flowrl.rewards"
_DISCOVERED = False


def register_reward(spec: Spec) -> Spec:
    """Class decorator: register ``spec`` (a RewardSpec subclass) under its ``type`` default."""
    if not (isinstance(spec, type) and issubclass(spec, RewardSpec)):
        raise TypeError(f"register_reward: {spec!r} is not a RewardSpec subclass")
    field = spec.model_fields["type"]
    name = field.default
    if not isinstance(name, str) or get_args(field.annotation) != (name,):
        raise TypeError(f"register_reward: {spec.__name__}.type must be Literal[NAME] = NAME, e.g. Literal['mine']")
    if ":" in name:
        raise TypeError(f"register_reward: {spec.__name__}: {name!r}: ':' separates a module from a name")
    shipped = spec.__module__.startswith(f"{_PACKAGE}.")
    known = _shipped().get(name) if shipped else _REGISTRY.get((spec.__module__, name))
    if known is not None and known.__qualname__ != spec.__qualname__:
        raise TypeError(f"register_reward: {name!r} is registered twice ({known.__module__}, {spec.__module__})")
    _REGISTRY[spec.__module__, name] = spec
    return spec


def _discover() -> None:
    """Import every module of flowrl.rewards once: each registers its own rewards."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    import flowrl.rewards as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    _DISCOVERED = True


def reward_types() -> dict[str, str]:
    """The shipped reward types (the modules of flowrl.rewards), sorted, each with the first
    line of its spec's docstring. A plugin's reward is reached only through its MODULE:NAME."""
    _discover()
    return {name: (spec.__doc__ or "").strip().split("\n")[0] for name, spec in sorted(_shipped().items())}


def _shipped() -> dict[str, type[RewardSpec]]:
    return {name: spec for (module, name), spec in _REGISTRY.items() if module.startswith(f"{_PACKAGE}.")}


def _choices() -> str:
    return f"{', '.join(reward_types())} (or MODULE:NAME / FILE.py:NAME for a reward of your own, {ADDING})"


def _import_plugin(ref: str, where: str) -> type[RewardSpec]:
    """The spec NAME of ``MODULE:NAME`` or ``FILE.py:NAME``, once the module is imported (and so
    has registered its rewards)."""
    module, _, name = ref.rpartition(":")
    if module.endswith(".py"):
        path = Path(module).expanduser().resolve()
        imported = f"flowrl_reward_plugin_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
        if imported not in sys.modules:
            if not path.is_file():
                raise ConfigError(f"{where}.type: {ref!r}: no file {path}")
            spec = importlib.util.spec_from_file_location(imported, path)
            assert spec is not None and spec.loader is not None
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[imported] = loaded
            try:
                spec.loader.exec_module(loaded)
            except Exception as exc:  # noqa: BLE001 - the user's file: any error, reported in one line
                del sys.modules[imported]
                raise ConfigError(f"{where}.type: importing {path} failed: {type(exc).__name__}: {exc}") from None
    else:
        imported = module
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - a missing module or one that raises on import
            raise ConfigError(
                f"{where}.type: {ref!r}: cannot import module {module!r} ({type(exc).__name__}: {exc}); put it on "
                "PYTHONPATH, or name its file: path/to/file.py:NAME"
            ) from None
    found = _REGISTRY.get((imported, name))
    if found is None:
        mine = sorted(n for m, n in _REGISTRY if m == imported)
        raise ConfigError(
            f"{where}.type: {ref!r}: {module} registers no reward {name!r} (it registers: {', '.join(mine) or 'none'}; "
            "a reward registers itself with @register_reward)"
        )
    return found


def spec_of(spec: Mapping[str, Any] | RewardSpec, where: str = "env.reward") -> RewardSpec:
    """The validated spec of a config mapping (nothing is built); ConfigError (one line naming
    ``where`` and the key) for an unknown type, an unknown key or a bad value."""
    if isinstance(spec, RewardSpec):
        return spec
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: a reward spec is a mapping with a 'type', got {spec!r}")
    kind = spec.get("type")
    _discover()
    if isinstance(kind, str) and ":" in kind:
        model = _import_plugin(kind, where)
    elif kind in _shipped():
        model = _shipped()[kind]
    else:
        raise ConfigError(f"{where}.type: {kind!r} is not one of {_choices()}")
    kind = model.model_fields["type"].default
    try:
        parsed = model.model_validate({**spec, "type": kind})
    except ValidationError as exc:
        # an unknown key first: a misspelt key also shows as the real one missing
        err = min(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        key = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            valid = ", ".join(model.model_fields)
            raise ConfigError(f"{where}: unknown key {key!r} for type {kind!r}; valid keys: {valid}") from None
        got = f" (got {err['input']!r})" if err["type"] not in ("missing", "value_error") else ""
        raise ConfigError(f"{where}.{key}: {err['msg'].removeprefix('Value error, ')}{got}") from None
    parsed.check_nested(where)
    return parsed


def check_reward(spec: Mapping[str, Any] | RewardSpec, where: str = "env.reward") -> None:
    """The spec validated and its ``preflight()`` run: a command calls this before it creates a
    run folder. A failure is one line naming the reward type."""
    parsed = spec_of(spec, where)
    try:
        parsed.preflight()
    except FlowRLError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of a user's reward, made one line
        raise RewardError(f"{where}: reward {parsed.type!r} failed its check: {type(exc).__name__}: {exc}") from None


def build_reward(spec: Mapping[str, Any] | RewardSpec, where: str = "env.reward") -> RewardModel:
    """The reward model ``spec`` describes. ConfigError for a bad spec (see ``spec_of``);
    RewardError (one line naming the reward type and the error) when its constructor raises or
    the model's ``name`` is not the spec's ``reward_name``."""
    parsed = spec_of(spec, where)
    try:
        model = parsed.build()
    except FlowRLError:
        raise
    except Exception as exc:  # noqa: BLE001 - any constructor's failure, made one line
        raise RewardError(
            f"{where}: reward model {parsed.type!r} raised while being built: {type(exc).__name__}: {exc}"
        ) from None
    name = getattr(model, "name", None)
    if name != parsed.reward_name:
        raise RewardError(
            f"{where}: reward model {parsed.type!r} is named {name!r} but its spec's reward_name is "
            f"{parsed.reward_name!r}: give the model a `name` attribute equal to it (a multi reward keys its "
            "components by name)"
        )
    return model


def per_reward_weights(spec: Mapping[str, Any]) -> dict[str, float] | None:
    """The component weights by name when ``spec`` asks GRPO for per-reward group advantages
    (a multi reward with ``advantages: per_reward``); None for advantages of the scores.
    Read from the spec: nothing is built."""
    return spec_of(spec).per_reward_weights()


__all__ = [
    "RewardSpec",
    "build_reward",
    "check_reward",
    "per_reward_weights",
    "register_reward",
    "reward_types",
    "spec_of",
]
