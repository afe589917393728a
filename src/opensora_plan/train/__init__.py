"""Training: one generic loop (``trainer``) serving the LatteT2V task (``t2v``) and the CausalVAE task (``vae``).

``trainer``     Trainer / TrainTask / Phase / TrainConfig / train: accelerate, checkpoints, resume, EMA, logs
``checkpoint``  atomic checkpoint folders, ``latest`` lookup, pruning, model folders
``sampler``     deterministic, resumable data order and per-sample seeding
``ema``         exponential moving average of the weights
``sharding``    FSDP2 sharding helpers (``--sharding fsdp2``)
``pretrained``  ``--pretrained`` loading with a full key report
``t2v``         the text-to-video task and ``train-t2v`` wiring
"""
