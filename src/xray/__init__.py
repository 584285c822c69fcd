"""xray: a chest X-ray classifier (NORMAL vs PNEUMONIA) on PyTorch Lightning.

The folders are the library, in layers (docs/ARCHITECTURE.md); the top-level modules are the commands
(``python -m xray.NAME``), which import the library and are never imported by it.
"""
