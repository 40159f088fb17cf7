"""`python -m resnet_lightning.bench`: data path, training speed and framework overhead
(tools/bench.py)."""

from resnet_lightning.tools.bench import main

if __name__ == "__main__":
    main()
