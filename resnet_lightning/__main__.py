"""`python -m resnet_lightning [overrides]`: train and test one configured run."""

from resnet_lightning.train import main

if __name__ == "__main__":
    main()
