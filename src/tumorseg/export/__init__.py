"""Export: a copy of the bundle with the package's wheel (MONAI Label, zip) and the MLflow pyfunc
model."""
