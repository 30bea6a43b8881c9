"""What every OpenAI request model shares: text that must be UTF-8, the refusal that names a field, and the base
model that refuses unknown fields."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


def _utf8(value: str) -> str:
    # JSON allows lone surrogates ("\ud800"); protobuf strings must be UTF-8, and would fail far from the field.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text is not valid UTF-8 (it holds a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]


class Unsupported(ValueError):
    """A field we read but cannot honour; ``param`` names it for the error body."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Request(BaseModel):
    # Unknown fields are refused (a typo must not be silently ignored), except the harmless ones listed.
    model_config = ConfigDict(extra="forbid")
