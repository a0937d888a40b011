"""Every field a run can set, with its default (one place). `maxscale.config` loads, overrides and validates them.

Sizes of 0 mean 'derive from the other fields'; the rules that derive them live in `maxscale.config.resolve`.
"""

from __future__ import annotations

import ml_collections


def defaults() -> ml_collections.ConfigDict:
    """Every field a run can set, with its default. Sizes of 0 mean 'derive from the other fields'."""
    c = ml_collections.ConfigDict()

    c.model = dict(
        width=256,  # d_model
        depth=4,  # number of transformer blocks
        num_heads=4,
        num_kv_heads=0,  # grouped-query attention; 0 = num_heads
        head_dim=0,  # 0 = width // num_heads
        ffn_size=0,  # 0 = 4 * width (gelu) or 8/3 * width rounded up to a multiple of 64 (swiglu)
        vocab_size=256,  # >= the tokenizer's (bytes: 256) and a token file's; 0 = data.tokenizer's, padded to 128
        mlp="swiglu",  # swiglu | gelu
        norm="rmsnorm",  # rmsnorm | layernorm
        norm_eps=1e-6,
        tie_embeddings=False,
        qk_norm=False,
        rope_theta=10_000.0,
        dtype="float32",  # compute dtype: float32 | bfloat16 (weights, optimizer state and the loss stay float32)
        param_dtype="float32",
        # what the backward pass recomputes per block (docs/performance.md): none | full | dots | dots_no_batch |
        # save_attn_out | offload; true/false (older configs) mean full/none
        remat=ml_collections.FieldReference("none", field_type=object),
        # auto (cudnn on NVIDIA GPUs with bfloat16, splash on TPUs, else xla) | xla | chunked | cudnn | splash |
        # explicit; docs/performance.md
        attention_impl="auto",
        attention_chunk_size=512,  # chunked attention: positions per block (a divisor of data.seq_len)
        loss_chunk_size=0,  # readout + loss over chunks of this many positions (a divisor of seq_len); 0 = at once
        output_z_loss=0.0,  # weight of the output z-loss, mean log(Z)^2 of the readout's softmax; 0 = off
        # Mixture of experts (maxscale/model/moe.py, docs/moe.md); num_experts=0 is a dense model.
        moe=dict(
            num_experts=0,  # E routed experts per MoE block
            num_active=2,  # k experts per token
            expert_ffn_size=0,  # M, hidden size of each expert; 0 = ffn_size // num_active (same active FLOPs)
            num_shared=0,  # shared experts run on every token
            shared_ffn_size=0,  # 0 = expert_ffn_size
            first_dense=0,  # the first n blocks keep a dense MLP; the rest are MoE ...
            every=1,  # ... every n-th of them: groups of n blocks, n - 1 dense then one MoE (2 = alternate)
            score="sigmoid",  # sigmoid (the paper) | softmax
            combine="mean_k",  # mean_k: (1/k) sum of gate x expert (the paper) | renorm: gates sum to 1 (Mixtral)
            balance="bias",  # bias: routing bias updated from the load, outside the optimizer | aux | none
            bias_rule="linear",  # linear: b -= rate (Load - k/E) (the paper) | sign: DeepSeek-V3
            bias_rate=0.01,  # linear: the paper's eta_b (b moves by rate x (Load - k/E) per step)
            aux_loss_weight=0.01,  # with balance=aux: weight of the load-balancing loss (1 at balance)
            z_loss_weight=0.0,  # router z-loss weight
            dispatch="dropless",  # dropless (ragged_dot; GPU/TPU) | capacity (fast on CPU) | dense (reference)
            capacity_factor=1.25,  # capacity: slots per expert = ceil(cf k tokens / E); later tokens drop first
        ),
    )

    # Rules live in maxscale/parameterization.py; these are their inputs. Base shapes of 0 = the model's own.
    c.parameterization = dict(
        name="sp",  # sp | mup | depth_mup | completep
        depth_alpha=-1.0,  # branch multiplier m_L^-alpha; -1 = the parameterization's own (0, 0, 1/2, 1)
        base_width=0,
        base_depth=0,
        base_num_heads=0,
        base_head_dim=0,
        base_ffn_size=0,
        init_std=0.02,  # sigma: base init std of every matrix
        embed_init_std=0.0,  # 0 = init_std
        input_mult=1.0,  # embedding output multiplier
        output_mult=1.0,  # readout multiplier (muP divides it by m_N)
        attn_mult=1.0,  # attention logit multiplier
        attn_exponent=-1.0,  # logit scale d_head^-exponent; -1 = the parameterization's own (1/2 SP, 1 muP)
        zero_init_readout=False,
        zero_init_query=False,
        scale_eps=True,  # muP-family eps scaling (CompleteP Table 1); off = the same eps everywhere
        eps_depth_scope="blocks",  # eps x m_L^-alpha on: blocks (CompleteP Table 1) | all (nanoGPT-mup completep)
        width_grows="head_dim",  # scale_shapes(): head_dim (fixed heads) | heads (fixed head dim)
        base_num_experts=0,  # MoE base shapes (0 = the model's own); k/E must match the base's (check_kappa)
        base_num_active=0,
        base_expert_ffn_size=0,
        router_init_gamma=1.0,  # router init std x (D/D0)^-gamma under muP-family rules (the paper: gamma = 1)
        expert_init_counts_experts=False,  # control: expert init x (E/E0)^-1/2 (MaxText's fan-in over experts)
        expert_down_init="mean_field",  # mean_field: sigma (D/D0)^1/2 (M/M0)^-1 (the paper) | fan_in (muP control)
        check_kappa=True,  # refuse k/E different from the base's: hyperparameters do not transfer across k/E
    )

    # Quantized training (maxscale/quant): formats none | int<b> (b = 2..16) | e<x>m<y> (1+x+y = 3..16 bits).
    c.quant = dict(
        weights="none",  # P_w: matmul weights (fake quantization, straight-through gradient)
        activations="none",  # P_a: matmul inputs
        kv="none",  # P_kv: attention keys and values
        weights_granularity="per_channel",  # per_tensor | per_channel | per_token | per_block
        activations_granularity="per_tensor",
        kv_granularity="per_token",
        block_size=32,  # per_block: values sharing one scale along the contracted axis
        whole_attention=False,  # also quantize queries and attention probabilities at the kv format (the paper)
        embeddings=False,  # quantize the embedding lookup's table too (hidden matrices always are)
        readout=False,
        router=False,
        asymmetric=False,  # integer formats: min/max with a zero point instead of symmetric absmax
        stochastic=False,  # stochastic rounding (integer formats)
    )

    c.optimizer = dict(
        name="adamw",
        lr=3e-3,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.0,
        weight_decay_mode="coupled",  # coupled: p -= lr*wd*p (torch AdamW); independent: p -= sched(t)*wd*p
        grad_clip=1.0,  # global mode: clip the global gradient norm at this value; 0 = no clipping in any mode
        grad_clip_mode="auto",  # global | relative: clip at grad_clip_ratio x the running mean norm | auto: SP
        # global, muP family relative (a fixed threshold means something else at every width; docs/training.md)
        grad_clip_ratio=2.0,
    )

    c.schedule = dict(
        name="cosine",  # constant | cosine | wsd | power
        warmup_steps=0,
        final_lr_fraction=0.1,  # cosine and wsd end at lr * this
        decay_fraction=0.2,  # wsd: the last fraction of steps decays linearly
        power_t0=100.0,  # power: eta0 * (1 + t/t0)^-chi * (1 - t/T)^delta
        power_chi=0.5,
        power_delta=0.0,
    )

    c.data = dict(
        source="stdlib",  # stdlib | text file, glob or directory | token file from tools/prepare_data.py
        seq_len=128,
        seed=0,
        eval_fraction=0.02,  # share of documents held out for eval
        max_bytes=0,  # 0 = no limit; caps the corpus read (useful for quick experiments)
        # byte | tiktoken:<encoding> | sentencepiece:<model file> | hf:<tokenizer.json> (docs/data.md); with
        # model.vocab_size=0 the model's vocabulary is the tokenizer's, padded to a multiple of 128
        tokenizer="byte",
    )

    # Writers beside metrics.jsonl and TensorBoard (maxscale/train/metrics.py).
    c.metrics = dict(
        wandb_project="",  # "" = no Weights & Biases; else log there (needs `pip install wandb`)
        wandb_mode="offline",  # offline (files under <workdir>/wandb, `wandb sync` later) | online
    )

    c.train = dict(
        batch_size=16,  # global, in sequences
        microbatches=1,  # gradient accumulation: the batch runs as this many slices (scan), one optimizer step
        steps=1000,
        seed=0,
        eval_every=200,
        eval_steps=4,
        log_every=10,
        # training-dynamics metrics (dyn/ in metrics.jsonl, docs/analysis.md) every this many steps, which are
        # then logged: per-group weight/gradient/update RMS, feature change per layer, attention entropy; 0 = off
        dyn_every=0,
        sample_tokens=200,  # generated at the end of the run; 0 = none
        sample_prompt="def ",
        peak_flops=0.0,  # per-device peak for MFU; 0 = known table, else a matmul measured at start
        nan_policy="stop",  # non-finite loss/gradient: stop (keep the last good checkpoint) | skip the update
        spike_factor=2.0,  # log a loss spike when a logged loss exceeds this x its running mean; 0 = off
        preempt_grace_s=0.0,  # after SIGTERM/SIGINT, exit within this many seconds, saved or not; 0 = no limit
        debug_nan_at_step=0,  # for tests: make the loss and gradients of this step NaN; 0 = off
    )

    # Two tiers (maxscale/train/checkpoint_tiers.py, docs/reliability.md): persistent <workdir>/checkpoints, and an
    # optional frequent local one (e.g. node-local disk) that restores first when it is newer and intact.
    c.checkpoint = dict(
        every=500,  # persistent tier; also at the end, on preemption and at each of keep_steps
        max_to_keep=3,  # rolling persistent steps, besides keep_steps
        keep_steps=(),  # steps saved to and never deleted from the persistent tier (analysis); CLI: =10,100,1000
        local_every=0,  # local tier, at steps that are not persistent saves; 0 = off
        local_dir="",  # "" = <workdir>/checkpoints_local; node-local paths (/tmp/...) need one process or sharing
        local_max_to_keep=2,
        async_save=True,
        verify=True,  # check each file's CRC-32 against the checkpoint's manifest before restoring
    )

    # Axis sizes in devices; -1 fills the rest. dcn_<axis>: how many slices (hosts joined by the data-centre
    # network) that axis spans, a divisor of its size; the rest of it stays inside a slice (ICI). docs/sharding.md
    # members: vectorized packs only (train/vectorized_mesh.py): the member axis is split over this many groups of
    # devices, the axes above describing one group; 1 = every member uses the whole mesh. Single runs ignore it.
    # member_batch: members a pack's step computes side by side (0 = auto: 1 on CPU, one after another; else all).
    c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1, dcn_expert=1)
    c.mesh.update(members=1, member_batch=0)

    c.distributed = dict(
        coordinator_address="",
        num_processes=0,
        process_id=-1,
        local_device_ids="",
    )
    return c
