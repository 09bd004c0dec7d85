"""Inference: the one predictor every entry point runs (tumorseg-predict, the bundle's inference,
MONAI Label, the MLflow model), its inferers and runtimes, the tumorseg-predict command and
DICOMweb inputs."""
