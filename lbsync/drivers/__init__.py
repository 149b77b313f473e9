"""LB drivers. Each module registers its class under its own name (``nginx`` → nginx.py);
``drivers.base.driver_for`` imports the one a target names."""
