"""A base model with adapters for a task: built from a recipe (`building`) or read back from a checkpoint
(`loading`, the one place that does). Sits on the task families, the recipe and the engine."""
