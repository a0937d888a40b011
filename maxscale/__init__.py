"""maxscale: training transformer language models for the science of scaling (README.md)."""

from maxscale import _host

_host.tune_malloc()
