"""``python -m hyperpy``: the same as the ``hyperpy`` command."""

from hyperpy.launch import main

if __name__ == "__main__":
    main()
