"""`python -m vctmae …` (also `torchrun -m vctmae …`) runs the command line."""

from vctmae.cli import main

if __name__ == "__main__":
    main()
