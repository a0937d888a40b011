"""A tiny mixture-of-experts model for tests and smoke runs: configs/tiny.py with 4 experts, top-2, capacity path."""

from maxscale.config import defaults


def get_config():
    c = defaults()
    c.model.update(width=64, depth=2, num_heads=4, ffn_size=128)
    c.model.moe.update(num_experts=4, num_active=2, expert_ffn_size=64, dispatch="capacity", capacity_factor=2.0)
    c.data.update(seq_len=64, max_bytes=2_000_000)
    c.train.update(batch_size=8, steps=100, eval_every=50, eval_steps=2, log_every=10, sample_tokens=64)
    c.optimizer.update(lr=1e-2)
    c.schedule.update(name="cosine", warmup_steps=10)
    c.checkpoint.update(every=50)
    return c
