"""Where a run writes what it did: a JSONL log and TensorBoard event files.

The JSONL log is the record. When the optional `tensorboard` extra is installed,
the numbers of the step and epoch records (loss, lr, samples/s, validation
metrics) and the pretraining previews also go to TensorBoard event files under
`<run folder>/tensorboard/` (torch's `SummaryWriter`; the paper's code logs
there, and it is what users open: `tensorboard --logdir runs/`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vctmae.files import out_of_space_as_error
from vctmae.provenance import git_commit, machine_info, versions


class RunLog:
    """Append-only JSONL log; the first record says where the run came from.

    Only the main process writes (others get `enabled=False` and do nothing).
    """

    def __init__(self, path: Path, *, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._board: Any = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._board = _summary_writer(self.path.parent / "tensorboard")

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"event": event, "time": time.time(), **fields}
        with out_of_space_as_error(self.path), self.path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        if self._board is not None and event in SCALAR_EVENTS and "step" in fields:
            for name, value in fields.items():
                if name not in ("step", "epoch") and isinstance(value, int | float):
                    self._board.add_scalar(f"{event}/{name}", value, global_step=fields["step"])
            if event == "epoch":
                self._board.flush()

    def image(self, tag: str, png: Path, *, step: int) -> None:
        """Also show a picture the run wrote (e.g. a preview) in TensorBoard."""
        if self._board is None:
            return
        import matplotlib.image

        picture = matplotlib.image.imread(png)[..., :3]  # (H, W, 3) floats in [0, 1]
        self._board.add_image(tag, picture, global_step=step, dataformats="HWC")
        self._board.flush()

    def close(self) -> None:
        if self._board is not None:
            self._board.close()
            self._board = None

    def start(self, *, command: str, config: dict[str, Any], **extra: Any) -> None:
        self.write(
            "start",
            command=command,
            config=config,
            versions=versions(),
            git_commit=git_commit(),
            machine=machine_info(),
            **extra,
        )


# Records whose numbers are TensorBoard scalars (at their optimizer step).
SCALAR_EVENTS = ("step", "epoch")


def _summary_writer(folder: Path) -> Any:
    """torch's SummaryWriter on `folder`, or None when the tensorboard package is not installed."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(folder))
