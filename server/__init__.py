"""dicomfl.server: Flower ServerApp, strategies, checkpoints, cross-site validation, reports, benchmark."""
