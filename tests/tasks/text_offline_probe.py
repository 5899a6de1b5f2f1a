"""Build the minilm-text model and data with every network connection refused.

Usage: python -m tests.tasks.text_offline_probe (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE unset)

Prints ``IMPORTED-BY-TASKS: ...`` (Hugging Face modules ``import fedsqueeze.tasks`` loaded),
then ``OFFLINE: ...`` (the hub's offline flag as huggingface_hub read it) and ``OK``.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

_HEAVY = ("transformers", "huggingface_hub", "tokenizers", "peft", "sentence_transformers")


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError(f"a network connection was attempted: {args!r}")


def main() -> int:
    socket.create_connection = _refuse
    socket.socket.connect = _refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = _refuse  # type: ignore[method-assign]
    from fedsqueeze.tasks import get_task

    print("IMPORTED-BY-TASKS:", ",".join(m for m in _HEAVY if m in sys.modules))
    task = get_task("minilm-text@max-length=16,train-examples=8,test-examples=4")
    data = task.load_data()
    model = task.build_model(0)
    model.eval()
    model(data.x_test)
    import huggingface_hub.constants

    print("OFFLINE:", huggingface_hub.constants.HF_HUB_OFFLINE)
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
