import sys

from diffdis.cli.cache import main

if __name__ == "__main__":
    sys.exit(main())
