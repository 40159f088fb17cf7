"""`python -m resnet_lightning.models` prints a markdown table of every registered model."""

from .complexity import zoo_table

print(zoo_table())
