"""The training run of `aflora train`: the loop, one optimizer step, progress on screen, trackers and DDP."""
