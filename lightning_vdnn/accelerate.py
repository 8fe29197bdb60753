"""``import lightning_vdnn.accelerate``: the Hugging Face Accelerate entry point (``prepare``, ``synchronize``,
``memory_report``, ``release``). It lives in ``integrations/accelerate.py``; this name is the same module."""

import sys

from lightning_vdnn.integrations import accelerate as _accelerate

sys.modules[__name__] = _accelerate
