"""aigc-ray: fine-tune and serve generative language models on a Ray cluster."""

__version__ = "0.1.0"
