"""maskdit_fast: fast training of masked diffusion transformers (MaskDiT) and DiT."""
from maskdit_fast.backend import get_backend, set_backend, use_backend

__version__ = "0.1.0"
__all__ = ["get_backend", "set_backend", "use_backend", "__version__"]
