"""Patch-embedding kernel benchmark; same as `vctmae bench kernel [--json PATH] [--quick]`."""

import sys

from vctmae.cli.app import app

if __name__ == "__main__":
    import vctmae.cli  # noqa: F401  (registers the commands)

    sys.exit(app(["bench", "kernel", *sys.argv[1:]]))
