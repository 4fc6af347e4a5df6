"""``python -m hyperpy``: the same as the ``hyperpy`` command."""

from hyperpy.cli import main

if __name__ == "__main__":
    main()
