"""``python -m dft_lightning`` entry point."""

from dft_lightning.cli import main

if __name__ == "__main__":
    main()
