import sys

from riffusion.cli import main

sys.exit(main())
