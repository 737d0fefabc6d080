"""characonsist: the same character across many images, without training, on FLUX.1 with diffusers."""

from .methods import METHODS, get_method
from .pipeline import CharaConsistPipeline, StoryPipelineOutput
from .story import StoryImage

__version__ = "0.1.0"

__all__ = ["METHODS", "CharaConsistPipeline", "StoryImage", "StoryPipelineOutput", "get_method", "__version__"]
