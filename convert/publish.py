"""python -m convert.publish: the command's short name; the code is convert.release.publish."""

import sys

from convert.release.publish import main

if __name__ == "__main__":
    sys.exit(main())
