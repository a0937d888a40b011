"""The base model of the transfer sweeps (docs/transfer.md): a small byte-level LM on the stdlib corpus.

Width 64, depth 2, 4 heads of 16, SwiGLU ffn 192 (3 x width), seq 64, batch 8, 200 steps of AdamW with a cosine
schedule (20 warmup steps), no weight decay and no clipping, so the LR optimum is about the parameterization alone.
The base shapes of the parameterizations are this model's; the sweeps scale it with `scale_shapes`.
"""

from maxscale.config import defaults


def get_config():
    c = defaults()
    c.model.update(width=64, depth=2, num_heads=4, ffn_size=192)
    c.data.update(source="stdlib", seq_len=64, max_bytes=2_000_000)
    c.train.update(
        batch_size=8, steps=200, eval_every=200, eval_steps=8, log_every=50, sample_tokens=0, peak_flops=1e11
    )  # a nominal peak: skips the matmul measurement (MFU is not used here)
    c.optimizer.update(lr=2.0**-6, weight_decay=0.0, grad_clip=0.0)
    c.schedule.update(name="cosine", warmup_steps=20, final_lr_fraction=0.1)
    c.checkpoint.update(every=200, max_to_keep=1, async_save=False)
    c.mesh.update(data=1)
    return c
