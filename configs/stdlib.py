"""The `make train` default: a small byte-level model on the Python standard library's sources (~6 min, 2 cores)."""

from maxscale.config import defaults


def get_config():
    c = defaults()
    c.model.update(width=256, depth=4, num_heads=4)
    c.data.update(source="stdlib", seq_len=128)
    c.train.update(batch_size=16, steps=500, eval_every=100, eval_steps=8, log_every=10, sample_tokens=300)
    c.optimizer.update(lr=3e-3, weight_decay=0.1)
    c.schedule.update(name="cosine", warmup_steps=50)
    c.checkpoint.update(every=100)
    return c
