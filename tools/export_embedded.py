import sys

from diffdis.cli.export_embedded import main

sys.exit(main())
