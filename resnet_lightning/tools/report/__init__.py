"""Reports from runs and from the model zoo, as markdown, CSV and PNG.

`python -m resnet_lightning.report --help` lists them: `summary` (a sweep's table and curves),
`params` (parameters per stage and layer type), `compare` (ResNet-50 against the networks the
paper compared it to) and `degradation` (the paper's Figure 6 from a sweep).
"""
