"""The ``synthmorph`` command line."""
