"""dicomfl.client: Flower ClientApp, site daemon, DP-SGD wiring and privacy-budget state."""
