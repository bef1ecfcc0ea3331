"""What test targets that record their evaluations need to know: whether an evaluation is a
JVP's or the forward-coverage check's, which runs the function once more under a dispatch
mode before a target's first answer (NOTE [forward mode: exact or refused] in
app/engine/forward_coverage.py)."""

from __future__ import annotations

from torch.utils._python_dispatch import _get_current_dispatch_mode


def jvp_evaluation() -> bool:
    """False inside the coverage check's pass, True in the JVP's own evaluation."""
    return _get_current_dispatch_mode() is None
