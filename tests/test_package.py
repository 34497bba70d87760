"""The package as users get it: a checkout used in place (PYTHONPATH=<checkout>, no pip install)."""
import os
import subprocess
import sys
import textwrap

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_checkout_without_install_finds_the_kernels():
    """setup.py maps <checkout>/kernels to maskdit_fast.kernels; without an install (no editable finder)
    the package must still import its Triton kernels from the checkout."""
    code = textwrap.dedent("""
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in repr(f)]  # as if not installed
        import maskdit_fast.kernels.flash_attn as fa
        print(fa.__file__)
    """)
    env = {**os.environ, "PYTHONPATH": CHECKOUT}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=CHECKOUT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == os.path.join(CHECKOUT, "kernels", "flash_attn.py")
