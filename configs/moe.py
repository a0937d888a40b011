"""A real small mixture-of-experts model on the Python stdlib corpus: width 256, depth 4, 8 experts, top-2.

    python -m maxscale.train --config=configs/moe.py --workdir=runs/moe

Dropless dispatch (the default; on CPU the tiled grouped matmul's loop) runs at 1.10x the capacity path's speed and
0.84x the dense model's on the 2-core CPU (docs/moe.md, "Dropless speed"); each expert has the dense model's
ffn_size / k hidden units, so the active FLOPs per token equal configs/stdlib.py's dense model.
"""

from maxscale.config import defaults


def get_config():
    c = defaults()
    c.model.update(width=256, depth=4, num_heads=4)
    c.model.moe.update(num_experts=8, num_active=2, dispatch="capacity", capacity_factor=1.25)
    c.data.update(seq_len=128)
    c.train.update(batch_size=16, steps=500, eval_every=100, eval_steps=8, log_every=10, sample_tokens=300)
    c.optimizer.update(lr=3e-3, weight_decay=0.1)
    c.schedule.update(name="cosine", warmup_steps=50)
    c.checkpoint.update(every=100)
    return c
