"""ORL: unsupervised object-level representation learning from scene images.

The shared library behind every service. It holds the science (three stages of
Xie et al., NeurIPS 2021) and imports no web, queue or database code.
"""

__version__ = "0.1.0"
