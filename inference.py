"""OmniAbnorm-CT inference: `python inference.py --input PATH --checkpoint DIR [...]` or `python inference.py --demo`.

The logic lives in the `inference` package (CLI in inference/cli.py, Python API in inference/pipeline.py); see
docs/inference.md.
"""

import sys

from inference.cli import main

if __name__ == "__main__":
    sys.exit(main())
