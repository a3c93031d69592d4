"""kdflow: knowledge distillation for language models.

Importing the package is cheap: torch, transformers and Flower are imported by the modules that
need them, so `kdflow --help` answers at once.
"""

__version__ = "0.1.0"
