"""OmniAbnorm-CT in the browser: `python app.py [--checkpoint DIR] [--demo] [--port PORT] [--host 127.0.0.1]`.

The logic lives in the `viewer` package (command line in viewer/app.py); see docs/viewer.md.
"""

import sys

from viewer.app import main

if __name__ == "__main__":
    sys.exit(main())
