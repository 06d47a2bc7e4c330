"""Run by every Python process the tests start (tests/conftest.py puts this folder first on their PYTHONPATH).

scikit-learn is in the test environment only because lm-eval (a client tests/test_clients.py drives, in the pytest
process) depends on it; no install of stip has it. Whenever it is importable, `import transformers`' model classes
import sklearn.metrics (and with it scipy.stats and pandas: 1-1.5 s of CPU) for assisted generation, which stip never
uses. Every `stip serve`, `stip protect` and benchmark child would pay that at start. Marking the module absent makes
the children import transformers as on a user's install: `import sklearn` raises ModuleNotFoundError and
importlib.util.find_spec("sklearn") is None (how transformers and torch probe for it).
"""

import sys

sys.modules.setdefault("sklearn", None)
