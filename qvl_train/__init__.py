"""qvl_train: a slim LoRA trainer streaming qvl shards."""
