"""``python -m stages.serve``: start the web page (see stages/serve/app.py for the options)."""

from stages.serve.app import cli

if __name__ == "__main__":
    cli()
