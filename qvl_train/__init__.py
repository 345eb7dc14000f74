"""qvl_train: a slim LoRA trainer for Qwen2.5-VL that streams qvl shards (``python -m qvl_train``).

Modules: ``config`` (the options), ``data`` (plan, shard dataset, rank split, collate), ``model`` (load,
LoRA, parameter report, tiny model), ``loop`` (the training loop, logging, checkpoints).
"""
