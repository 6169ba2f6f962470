import sys

from diffdis.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
