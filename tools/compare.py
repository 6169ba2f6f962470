import sys

from diffdis.cli.compare import main

sys.exit(main())
