from training.toyworld.cli import app

app()
