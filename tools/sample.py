import sys

from diffdis.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
