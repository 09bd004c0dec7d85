"""Tracking: MLflow on top of MONAI's MLFlowHandler (runs, parent recipe runs, the registered
model) and the tumorseg-runs command."""
