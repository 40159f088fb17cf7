"""Tools around runs, each behind its own command: evaluate (`python -m resnet_lightning.eval`),
bench and the plain loop it compares with (`.bench`), and the reports (`.report`)."""
