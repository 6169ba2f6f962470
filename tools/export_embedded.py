import sys

from diffdis.cli.export_embedded import main

if __name__ == "__main__":
    sys.exit(main())
