import sys

from maxscale.tools.params_table import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
