"""The AFLoRA engine: adapter layer, injection, freezing, checkpoints — no CLI in here."""
