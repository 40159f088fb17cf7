"""Training: the LightningModule, the run's config, resuming, the launch of one process per
device, and `train()` itself (train.py, behind `python -m resnet_lightning`)."""
