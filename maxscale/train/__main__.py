import sys

from maxscale.train.command import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
