"""maskdit_fast: fast training of masked diffusion transformers (MaskDiT) and DiT."""
import importlib.util as _util
import os as _os
import sys as _sys

from maskdit_fast.backend import get_backend, set_backend, use_backend

__version__ = "0.1.0"
__all__ = ["get_backend", "set_backend", "use_backend", "__version__"]


def _checkout_kernels():
    """A checkout used without installing (PYTHONPATH=<checkout>): setup.py installs <checkout>/kernels as
    maskdit_fast.kernels, so register that one package under its installed name. Only that directory is
    added: the package's own __path__ stays the package directory, so no other checkout file (setup.py,
    benchmarks/...) resolves as a submodule. Installed copies have kernels/ inside the package."""
    name = __name__ + ".kernels"
    here = _os.path.dirname(_os.path.abspath(__file__))
    kernels = _os.path.join(_os.path.dirname(here), "kernels")
    if (name in _sys.modules or _os.path.isdir(_os.path.join(here, "kernels"))
            or not _os.path.isfile(_os.path.join(kernels, "flash_attn.py"))):
        return
    spec = _util.spec_from_file_location(name, _os.path.join(kernels, "__init__.py"),
                                         submodule_search_locations=[kernels])
    module = _util.module_from_spec(spec)
    _sys.modules[name] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module  # what an import of the submodule sets on its parent


_checkout_kernels()
