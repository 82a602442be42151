import sys

from checkpoint_tools.cli import main

if __name__ == "__main__":  # multiprocessing's spawn re-imports the main module
    sys.exit(main())
