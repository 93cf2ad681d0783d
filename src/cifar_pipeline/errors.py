"""Errors a user can act on: the CLI prints them as one line, without a traceback."""


class PipelineError(Exception):
    """A problem with the input or the environment; the message names it and the fix."""

    exit_code = 1


class ConfigError(PipelineError):
    """params.yaml is missing a key, has an unknown one, or a value of the wrong type."""

    exit_code = 2
