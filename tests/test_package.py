"""The package as users get it: a checkout used in place (PYTHONPATH=<checkout>, no pip install), and the
layering of its modules (the Triton kernels import nothing from maskdit_fast.ops)."""
import ast
import os
import subprocess
import sys
import textwrap

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_from_checkout(code):
    """Runs code in a fresh interpreter with PYTHONPATH=<checkout> and no editable-install finder."""
    code = ('import sys\nsys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in repr(f)]\n'
            + textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": CHECKOUT}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=CHECKOUT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_checkout_without_install_finds_the_kernels():
    """setup.py maps <checkout>/kernels to maskdit_fast.kernels; without an install (no editable finder)
    the package must still import its Triton kernels from the checkout."""
    out = _run_from_checkout("""
        import maskdit_fast.kernels.flash_attn as fa
        from maskdit_fast.kernels import _config
        print(fa.__file__, _config.__file__)
    """)
    assert out == [os.path.join(CHECKOUT, "kernels", "flash_attn.py"), os.path.join(CHECKOUT, "kernels", "_config.py")]


def test_checkout_files_are_not_submodules():
    """Only kernels/ is mapped into the package: setup.py (or any other checkout file) is no submodule."""
    out = _run_from_checkout("""
        import importlib.util
        import maskdit_fast
        print(importlib.util.find_spec("maskdit_fast.setup"), importlib.util.find_spec("maskdit_fast.benchmarks"),
              len(maskdit_fast.__path__))
    """)
    assert out == ["None", "None", "1"]


def _imported_modules(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_kernels_are_a_leaf_layer():
    """The Triton kernels sit below the ops: no kernel module imports maskdit_fast.ops (statically, and
    importing every kernel module loads no ops module)."""
    kernel_dir = os.path.join(CHECKOUT, "kernels")
    modules = sorted(f[:-3] for f in os.listdir(kernel_dir) if f.endswith(".py"))
    assert {"flash_attn", "gather_scatter", "modulate"} <= set(modules)
    for name in modules:
        bad = [m for m in _imported_modules(os.path.join(kernel_dir, name + ".py")) if m.startswith("maskdit_fast.ops")]
        assert not bad, f"kernels/{name}.py imports {bad}"
    out = _run_from_checkout(f"""
        import os, sys
        os.environ["TRITON_INTERPRET"] = "1"
        for name in {modules!r}:
            __import__("maskdit_fast.kernels." + name)
        print(sorted(m for m in sys.modules if m.startswith("maskdit_fast.ops")) or "none")
    """)
    assert out == ["none"]


def test_indexing_imports_torch_only():
    """maskdit_fast.indexing sits below both the ops and the kernels."""
    imported = set(_imported_modules(os.path.join(CHECKOUT, "maskdit_fast", "indexing.py")))
    assert imported == {"torch"}
