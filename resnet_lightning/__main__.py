"""`python -m resnet_lightning [overrides]`: train and test one configured run
(training/train.py)."""

from resnet_lightning.training.train import main

if __name__ == "__main__":
    main()
