"""The base of every config section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_serializer, model_validator


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
