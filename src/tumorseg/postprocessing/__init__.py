"""Post-processing, every step in one place: the presence gate, the box fit, the second stage
(refiner), the learned presence decision."""
