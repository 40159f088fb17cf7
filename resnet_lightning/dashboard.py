"""`python -m resnet_lightning.dashboard <sweep dir | storage URL | journal file>`:
optuna-dashboard over a sweep's Optuna study (tools/dashboard.py)."""

import sys

from resnet_lightning.tools.dashboard import main

if __name__ == "__main__":
    sys.exit(main())
