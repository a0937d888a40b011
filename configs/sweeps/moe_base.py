"""The base model of the MoE transfer sweeps: transfer_base.py's model with 4 experts, top-2, expert size 96.

Capacity dispatch with capacity_factor = E / k, so no token is dropped at any size; the balance bias (linear rule).
The MoE base shapes are this model's (E0 = 4, k0 = 2, M0 = 96); the sweeps grow E with k/E fixed, or M.
"""

import os

from maxscale import config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfer_base.py")


def get_config():
    c = config.load(BASE)
    c.model.moe.update(num_experts=4, num_active=2, expert_ffn_size=96, dispatch="capacity", capacity_factor=2.0)
    c.parameterization.update(base_num_experts=4, base_num_active=2, base_expert_ffn_size=96)
    return c
