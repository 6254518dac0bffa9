"""python -m convert.verify: the command's short name; the code is convert.release.verify."""

import sys

from convert.release.verify import main

if __name__ == "__main__":
    sys.exit(main())
