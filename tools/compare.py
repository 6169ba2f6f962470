import sys

from diffdis.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
