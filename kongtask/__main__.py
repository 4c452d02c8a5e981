"""``python -m kongtask``: the command line (as the ``kongtask`` script)."""

from kongtask._cli import run_cli

if __name__ == "__main__":
    run_cli()
