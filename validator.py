"""The seed's command, kept working: `python3 validator.py --wallet.name … --netuid 212 --bucket …`."""

import sys

from bistro.cli import main

if __name__ == "__main__":
    sys.exit(main(["validator", *sys.argv[1:]]))
