from polymodal.toyworld.cli import app

app()
