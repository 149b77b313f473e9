"""Stage: the staging tree the LB's checker reads (``tree``), and the swap of the checked
files into place with their last-known-good copies (``swap``)."""
