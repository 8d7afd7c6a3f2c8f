"""aflora from Python: `add_adapters` and friends (`adapters`) and `AfloraCallback` for the Hugging Face
Trainer and TRL (`callback`). The names are exported from `aflora_cli` itself."""
