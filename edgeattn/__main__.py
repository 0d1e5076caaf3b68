"""``python -m edgeattn``: the ``edgeattn`` command, for when the script is not on PATH."""

from edgeattn.cli import main

if __name__ == "__main__":
    main()
