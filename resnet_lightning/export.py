"""`python -m resnet_lightning.export ckpt_path=... format=onnx|torchscript|exported_program`:
a checkpoint's network for deployment, checked against it (tools/export.py)."""

from resnet_lightning.tools.export import main

if __name__ == "__main__":
    main()
