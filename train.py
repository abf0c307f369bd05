"""Train OmniAbnorm-CT: `python train.py --config train.yaml [key=value ...]`, or the same under
`torchrun --nproc_per_node=N`. See docs/training.md."""

import sys

from training.loop import main

if __name__ == "__main__":
    sys.exit(main())
