import sys

from diffdis.cli.ablation import main

if __name__ == "__main__":
    sys.exit(main())
