"""Reading and writing: inputs (PNG/JPG, NIfTI, DICOM) in the canonical orientation, datalists,
outputs written atomically (masks, DICOM SEG, overlays), file digests."""
