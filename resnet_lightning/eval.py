"""`python -m resnet_lightning.eval ckpt_path=... [predict=...]`: test a checkpoint or predict
images with it (tools/evaluate.py)."""

from resnet_lightning.tools.evaluate import main

if __name__ == "__main__":
    main()
