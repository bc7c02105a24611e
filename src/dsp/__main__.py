import sys

from dsp.cli import main

sys.exit(main())
