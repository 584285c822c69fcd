"""Inference and deployment: checkpoints, the predictor, OOD scores, Grad-CAM, prediction on files, export."""
