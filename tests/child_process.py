"""The start of a child-process script that must run without hf-dgm importable (run it with `python -I`): code a
test loads from the Hub or a folder then proves that it travels with the model."""

WITHOUT_HF_DGM = '''
import sys
# The editable install of hf-dgm is an import finder: drop it, so only code downloaded with the model is there.
sys.meta_path[:] = [finder for finder in sys.meta_path
                    if "__editable__" not in getattr(finder, "__module__", "") + type(finder).__module__]
for module in ("modeling_maf", "modeling_cyclegan", "hf_dgm_training"):
    try:
        __import__(module)
    except ImportError:
        pass
    else:
        sys.exit(f"{module} is importable in the child process; the test would prove nothing")
'''
