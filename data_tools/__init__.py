"""Dataset conversion: public downloads to MONAI datalists (one module per dataset)."""
