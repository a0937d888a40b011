"""Character-level Shakespeare. The text file is the argument:

python -m maxscale.train --config=configs/shakespeare.py:path/to/tinyshakespeare.txt --workdir=runs/shakespeare
"""

from maxscale.config import defaults


def get_config(path: str = "tinyshakespeare.txt"):
    c = defaults()
    c.model.update(width=256, depth=4, num_heads=4)
    c.data.update(source=path, seq_len=256, eval_fraction=0.1)
    c.train.update(batch_size=16, steps=1000, eval_every=250, eval_steps=8, sample_prompt="ROMEO:\n")
    c.optimizer.update(lr=3e-3, weight_decay=0.1)
    c.schedule.update(name="cosine", warmup_steps=50)
    return c
