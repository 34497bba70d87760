"""maskdit_fast: fast training of masked diffusion transformers (MaskDiT) and DiT."""
import os as _os

from maskdit_fast.backend import get_backend, set_backend, use_backend

__version__ = "0.1.0"
__all__ = ["get_backend", "set_backend", "use_backend", "__version__"]

# A checkout used without installing (PYTHONPATH=<checkout>): setup.py installs <checkout>/kernels as
# maskdit_fast.kernels, so let the package find it there too. Installed copies have kernels/ inside.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (not _os.path.isdir(_os.path.join(__path__[0], "kernels"))
        and _os.path.isfile(_os.path.join(_checkout, "kernels", "flash_attn.py"))):
    __path__.append(_checkout)
