"""Small functional building blocks (sampling, grids, integration), shared by every layer.

Nothing in here imports other parts of the package.
"""
