"""Parameter types and the one-line configuration error, shared by the config layer and the scenarios.

A bottom layer (pydantic only): scenarios annotate their constructor parameters with these types and
raise :func:`param_error`, without importing the config layer above them (DESIGN §2).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, Strict


class ConfigError(ValueError):
    """Invalid recipe; ``str(err)`` is the one-line message shown to the user."""


# Constrained parameter types for component signatures (config.check_params reads the annotations).
# Strict: 5.0, "5" and true are not integers (the component would get them unconverted and fail).
PosInt = Annotated[int, Strict(), Field(gt=0)]
NonNegInt = Annotated[int, Strict(), Field(ge=0)]
Seed32 = Annotated[int, Strict(), Field(ge=0, le=2**32 - 1)]  # numpy RandomState seeds
Bool = Annotated[bool, Strict()]
Number = Annotated[float, Strict()]  # an int or a float (not a string, not a bool)
OpenUnit = Annotated[float, Strict(), Field(gt=0, lt=1)]  # (0, 1)
PosFloat = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]  # a finite number > 0 (an int too)


def param_error(key: str, value: Any, allowed: str) -> ConfigError:
    """The one-line error of a bad scenario parameter: ``scenario.<key> = <value>: <what is allowed>``."""
    return ConfigError(f"scenario.{key} = {value!r}: {allowed}")
