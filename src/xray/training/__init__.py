"""Training: the LightningModule, its callbacks, and what train.py runs."""
