"""characonsist: the same character across many images, without training, on FLUX.1 with diffusers."""

from .story import StoryImage

__version__ = "0.1.0"

__all__ = ["StoryImage", "__version__"]
