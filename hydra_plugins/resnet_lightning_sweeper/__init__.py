"""This project's Hydra plugins. Hydra finds them through the `hydra_plugins` namespace package
(pyproject's package find ships it), and imports every module here at start-up: keep them light."""
