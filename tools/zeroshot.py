import sys

from diffdis.cli.zeroshot import main

if __name__ == "__main__":
    sys.exit(main())
