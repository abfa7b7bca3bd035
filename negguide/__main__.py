"""``python -m negguide``: the ``negguide`` command, for environments without the console script."""

from negguide.cli import main

if __name__ == "__main__":
    main(prog_name="negguide")
