import sys

from maxscale.parameterization.table import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
