"""`python -m resnet_lightning.models` prints a markdown table of every registered model."""

from .summary import markdown_table

print(markdown_table())
