"""`python -m resnet_lightning.report`: sweep summaries, parameter charts, the architecture
comparison and the degradation figure (tools/report/)."""

import sys

from resnet_lightning.tools.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
