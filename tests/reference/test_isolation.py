import subprocess
import sys


def test_the_reference_never_imports_the_fast_path():
    code = ("import sys, fastpurify.reference, fastpurify.pruning, fastpurify.masks, fastpurify.ranking; "
            "print([m for m in sys.modules if m.split('.')[:2] in (['fastpurify', 'functional'], "
            "['fastpurify', 'layers'], ['fastpurify', 'kernels']) or m == 'triton' or m.startswith('triton.')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
