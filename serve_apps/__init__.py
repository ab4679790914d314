"""Whitelisted Ray Serve apps for streaming jobs (issue 4). Empty in the walking skeleton."""

__all__: list[str] = []
