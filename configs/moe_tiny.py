"""A tiny mixture-of-experts model for tests and smoke runs: configs/tiny.py with 4 experts, top-2, capacity path."""

import os

from maxscale import config


def get_config():
    c = config.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
    c.model.moe.update(num_experts=4, num_active=2, expert_ffn_size=64, dispatch="capacity", capacity_factor=2.0)
    return c
