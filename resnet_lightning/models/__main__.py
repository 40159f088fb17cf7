"""`python -m resnet_lightning.models` prints a markdown table of every registered model."""

from .complexity import zoo_table

for line in zoo_table():
    print(line, flush=True)
