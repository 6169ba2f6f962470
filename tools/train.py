import sys

from diffdis.cli.train import main

sys.exit(main())
