"""`aflora sweep`: every `aflora train` a grid of settings, a learning-rate ladder and seeds imply, then a report
of the metric against trainable parameters with paired differences against a baseline."""
