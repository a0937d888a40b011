"""The defaults, unchanged: every field a run can set (see maxscale/config.py for what each means)."""

from maxscale.config import defaults


def get_config():
    return defaults()
