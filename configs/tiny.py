"""A tiny model for tests and smoke runs: 100 steps in well under a minute on 2 CPU cores."""

from maxscale.config import defaults


def get_config():
    c = defaults()
    c.model.update(width=64, depth=2, num_heads=4, ffn_size=128)
    c.data.update(seq_len=64, max_bytes=2_000_000)
    c.train.update(batch_size=8, steps=100, eval_every=50, eval_steps=2, log_every=10, sample_tokens=64)
    c.optimizer.update(lr=1e-2)
    c.schedule.update(name="cosine", warmup_steps=10)
    c.checkpoint.update(every=50)
    return c
