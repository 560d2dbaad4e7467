"""Loading experiments: YAML + ``key.sub=value`` overrides -> a validated ExperimentConfig,
with one-line errors that name the file, the key and the fix."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from flowrl.config.schema import (
    ENV_TYPES,
    IMAGE_POLICY_TYPES,
    MOVED,
    POLICY_TYPES,
    ExperimentConfig,
    _env_tag,
    _policy_tag,
)
from flowrl.errors import ConfigError  # defined low, so that the reward registry can raise it too


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


def _delete_dotted(data: dict[str, Any], dotted: str, source: str) -> None:
    """``~key.sub``: removes the key (back to its default), e.g. a ReinFlow file's
    ``algo.noise_lr`` when the command line switches it to a fixed-noise converter."""
    node: Any = data
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict) or keys[-1] not in node:
        raise ConfigError(f"{source}: override ~{dotted}: the experiment has no key '{dotted}' to remove")
    del node[keys[-1]]


DELETE = object()  # parse_override's value for ``~key``


def is_override(text: str) -> bool:
    """A command-line word that is an override (``key=value`` or ``~key``), not a file."""
    return "=" in text or text.startswith("~")


def _malformed_key(key: str) -> bool:
    return not key or any(not part for part in key.split("."))


def parse_override(text: str) -> tuple[str, Any]:
    """``'algo.clip=0.1'`` -> ``('algo.clip', 0.1)``; the value is parsed as YAML.
    ``'~algo.noise_lr'`` -> ``('algo.noise_lr', DELETE)``: remove the key."""
    if text.startswith("~"):
        key = text[1:]
        if "=" in key or _malformed_key(key):
            raise ConfigError(f"bad override {text!r}: expected ~key.sub, e.g. ~algo.noise_lr (removes the key)")
        return key, DELETE
    key, sep, raw = text.partition("=")
    if not sep or _malformed_key(key):
        raise ConfigError(f"bad override {text!r}: expected key.sub=value, e.g. algo.clip=0.1")
    try:
        return key, yaml.safe_load(raw) if raw else ""
    except (yaml.YAMLError, RecursionError) as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"override {key}: cannot parse value {raw[:80]!r} ({problem})") from None


def _dotted_loc(loc: tuple[Any, ...], data: Any) -> str:
    """Error location as the user wrote it: drops pydantic's union tags (e.g. 'reinflow', 'flow')."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(node, dict) and item in node:
            parts.append(str(item))
            node = node[item]
        elif isinstance(node, dict) and (node.get("type") == item or item in (_policy_tag(node), _env_tag(node))):
            continue
        else:
            parts.append(str(item))
            node = None
    return ".".join(parts)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _section_keys(dotted_parent: str, data: Any) -> list[str] | None:
    """The valid keys of the section at ``dotted_parent``, for the type ``data`` gives it."""
    model: Any = ExperimentConfig
    node = data
    for part in [p for p in dotted_parent.split(".") if p]:
        field = model.model_fields.get(part)
        node = node.get(part) if isinstance(node, dict) else None
        candidates = _models_in(field.annotation) if field is not None else []
        if len(candidates) > 1:
            kind = node.get("type") if isinstance(node, dict) else None
            fits = [
                m
                for m in candidates
                if "type" in m.model_fields and kind in get_args(m.model_fields["type"].annotation)
            ]
            if not fits and kind is None:
                fits = [
                    m for m in candidates if m.model_fields.get("type") and m.model_fields["type"].default is not None
                ]
            candidates = fits[:1]
        if len(candidates) != 1:
            return None
        model = candidates[0]
    return list(model.model_fields)


def moved_keys(data: dict[str, Any]) -> list[str]:
    """One line per key of an older flowrl that now lives elsewhere."""
    lines = []
    for old, new in MOVED.items():
        node: Any = data
        for part in old.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:
            lines.append(f"'{old}' has moved to {new}")
    return lines


_ABSENT = object()


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
            valid = _section_keys(parent, data)
            hint = f"; valid keys{' in ' + parent if parent else ''}: {', '.join(valid)}" if valid else ""
            lines.append(f"{source}: unknown key '{key}'{origin}{hint}")
        elif err["type"] == "policy_type":
            kind = err["input"].get("type") if isinstance(err["input"], dict) else err["input"]
            kinds = ", ".join((*POLICY_TYPES, *IMAGE_POLICY_TYPES))
            lines.append(f"{source}: policy.type: {kind!r} is not one of {kinds}{origin}")
        elif err["type"] == "env_type":
            kind = err["input"].get("type") if isinstance(err["input"], dict) else err["input"]
            lines.append(f"{source}: env.type: {kind!r} is not one of {', '.join(ENV_TYPES)}{origin}")
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
    data = copy.deepcopy(data)
    overridden = set()
    parsed = [parse_override(text) for text in overrides]
    keys = [key for key, _ in parsed]
    if "algo" not in data and "algo" not in keys and any(k.startswith("algo.") for k in keys):
        data["algo"] = {"type": "ppo"}  # overriding keys of the default algorithm (algo.type=... still wins)
    for key, value in parsed:
        if value is DELETE:
            _delete_dotted(data, key, source)
        else:
            _set_dotted(data, key, value)
        overridden.add(key)
    moved = moved_keys(data)
    if moved:
        raise ConfigError("\n".join(f"{source}: {line}" for line in moved))
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
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; an experiment is a YAML file") from None
    except (yaml.YAMLError, RecursionError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return build_config(data, str(path), overrides)


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config (atomically: a killed process never leaves half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)
