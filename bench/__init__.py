"""lbsync benchmarks: ``python -m bench all`` or ``python -m bench <name>`` (see __main__)."""
