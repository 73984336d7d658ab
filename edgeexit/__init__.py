"""edgeexit: train multi-exit (MLCSD) classifiers and deploy them as calibrated early-exit cascades."""

__version__ = "0.1.0"
