from aflora_cli.cli import app

app()
