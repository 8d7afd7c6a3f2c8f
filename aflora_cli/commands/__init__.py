"""The work of `aflora eval`, `generate`, `merge` and `inspect` (with `--plot`), and how their results are
rendered; each reads a checkpoint through `aflora_cli.adapted.loading`."""
