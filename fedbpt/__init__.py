"""The `fedbpt` command line and the embedded default assets."""
