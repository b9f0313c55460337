"""dgserve: a model server for dynamic-graph vision networks that shows the path each image took."""

__version__ = "0.1.0"
