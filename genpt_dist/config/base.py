"""The base class of every config section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: an unknown key or a bad value fails validation, and so does a bad assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
