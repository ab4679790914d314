"""Bounded numbers for every message that crosses a process or trust boundary.

A number from outside is finite and ranged before anything uses it: a NaN or an infinity never
reaches a deadline (``deadline <= now`` is never true for NaN), and an integer never exceeds
what the database stores (a 64-bit column) or what the code does with it. A value out of range
is a validation error, which every door answers with 422 and the error JSON.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

INT64_MAX = 2**63 - 1

UnixNs = Annotated[int, Field(ge=0, le=INT64_MAX, description="Unix time, ns")]
Int64 = Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)]
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]
Attempt = Annotated[int, Field(ge=0, le=2**31 - 1)]
ExitCode = Annotated[int, Field(ge=-(2**31), le=2**32 - 1)]  # signed on some systems, unsigned on others
Port = Annotated[int, Field(ge=1, le=65535)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
