"""The .dln grammar, shipped as package data and loaded with importlib.resources."""
