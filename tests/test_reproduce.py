"""docs/reproduce.md cannot rot: every command of its `sh` blocks runs, in document order.

The commands run through the command line in this process (as `vctmae …` would), on tiny
synthetic phantoms, with a few options appended to each to make it a one-epoch smoke run of
the shrunken `tiny` model on the CPU (the document's own flags come first, so a flag it sets
is still set: these only add sizes and speed settings it does not name). A command that names
a 3-D preset (`--model mae3d-…`, Table 3's 3D MAE rows) runs the shrunken `mae3d-tiny`
instead. The Kinetics-700 file is a random-initialised stand-in in mae_st's PySlowFast layout,
224² (14 × 14 positions), written here.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from helpers import SMALL_MODEL, cli, read_log, shrink
from reference_code import mae_st_state, to_pyslowfast

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reproduce.md"

# Appended to each command: one epoch of the shrunken tiny model, in this process, on the CPU.
SMOKE = {
    "ingest": ["--workers", "2", "--no-progress"],
    "pretrain": ["--model", "tiny", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4",
                 "--workers", "0", "--device", "cpu", "--no-progress", "--no-preview"],
    "finetune": ["--model", "tiny", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4",
                 "--workers", "0", "--device", "cpu", "--no-progress"],
    "eval": ["--batch-size", "8", "--workers", "0", "--device", "cpu", "--no-progress"],
}  # fmt: skip


def smoke_command(command: list[str]) -> list[str]:
    """The arguments a document command runs with here: its own, then `SMOKE`'s; a 3-D preset
    (`--model mae3d-…`) becomes the shrunken `mae3d-tiny`, a video one stays `tiny`."""
    args, smoke = list(command[1:]), list(SMOKE[command[1]])
    if "--model" in args:
        at = args.index("--model") + 1
        assert args[at].startswith("mae3d-"), args  # the document names only the 3-D presets
        args[at] = "mae3d-tiny"
        at = smoke.index("--model")
        del smoke[at : at + 2]
    return [*args, *smoke]


def shrink_mae3d(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--model mae3d-tiny` builds the 3-D model at the shrunken test widths."""

    from vctmae.model import config as model_config

    small = model_config.preset_config("mae3d-tiny", **SMALL_MODEL)
    monkeypatch.setitem(model_config.PRESETS, "mae3d-tiny", small)


def document_commands(text: str) -> list[list[str]]:
    """The commands of every ```sh block, in order: comments dropped, `\\` continuations joined,
    environment variables expanded, split as a shell splits words (quoted globs stay globs)."""
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(os.path.expandvars(line)))
    return commands


def kinetics_stand_in(path: Path) -> None:
    """A random ViT of the shrunken tiny shape in PySlowFast's `.pyth` layout at 224² (14 × 14
    spatial positions, decoder table with a cls row), as mae_st publishes the K700 weights."""

    state = mae_st_state(
        dim=SMALL_MODEL["embed_dim"], depth=SMALL_MODEL["depth"],
        decoder_dim=SMALL_MODEL["decoder_embed_dim"], decoder_depth=SMALL_MODEL["decoder_depth"],
        side=14, decoder_layout="full", decoder_cls=True, seed=5,
    )  # fmt: skip
    del state["decoder_cls_token"]
    pyslowfast = to_pyslowfast(state, decoder_depth=SMALL_MODEL["decoder_depth"])
    torch.save({"epoch": 400, "model_state": pyslowfast, "cfg": "MAE:\n  ENABLE: true\n"}, path)


def test_every_command_of_reproduce_md_runs(tmp_path, monkeypatch):
    from vctmae.synth import SynthConfig
    from vctmae.synth.phantoms import write_phantoms

    text = DOC.read_text()
    commands = document_commands_with(text, tmp_path, monkeypatch)
    assert commands and all(c[0] == "vctmae" for c in commands), commands
    stages = [c[1] for c in commands]
    # Every Table 2 row and the Table 3 rows are there.
    for heading in [
        "Row 1",
        "Row 2",
        "Row 3",
        "Row 4",
        "Row 5",
        "Row 6",
        'Table 3, "Video-CT MAE, −"',
        'Table 3, "3D MAE, vertebrae"',
        'Table 3, "3D MAE, −"',
    ]:
        assert f"### {heading}" in text, heading
    assert stages.count("eval") >= 10 and stages.count("finetune") >= 9

    write_phantoms(SynthConfig(out=tmp_path / "raw-unlabeled", cases=4, seed=1))
    (tmp_path / "raw-unlabeled" / "labels.csv").unlink()  # an unlabelled set
    write_phantoms(SynthConfig(out=tmp_path / "raw-labeled", cases=10, seed=2, fracture_rate=0.5))
    kinetics_stand_in(tmp_path / "k700_400ep_rep4_mr9_16x4.pyth")
    shrink(monkeypatch)
    shrink_mae3d(monkeypatch)
    for command in commands:
        result = cli(*smoke_command(command))
        assert result.exit_code == 0, (command, result.output, result.exception)
    runs = tmp_path / "runs"
    for row in (
        "full",
        "row1",
        "row2",
        "row3",
        "row4",
        "row5",
        "row6",
        "table3-scratch",
        "mae3d",
        "mae3d-scratch",
        "reference",
    ):
        assert (runs / row / "eval" / "metrics.json").is_file(), row
    # Row 5 trained on 224² frames: its classifier has the 14 × 14 table.
    from vctmae.model.checkpoint import read_model_config

    _, config = read_model_config(runs / "row5" / "finetune" / "best.safetensors")
    assert config.img == 224 and config.num_tokens == 1568
    # The 3D MAE rows trained the 3-D model, pretraining at the paper's mask ratio 0.75.
    for row in ("mae3d", "mae3d-scratch"):
        _, config = read_model_config(runs / row / "finetune" / "best.safetensors")
        assert config.volume and config.num_tokens == 216, row
    pretrain_start = read_log(runs / "mae3d" / "pretrain" / "log.jsonl")[0]
    assert pretrain_start["config"]["mask_ratio"] == 0.75


def document_commands_with(
    text: str, root: Path, monkeypatch: pytest.MonkeyPatch
) -> list[list[str]]:
    """`document_commands` with the document's variables pointing into `root`."""
    for name, value in {
        "K700": root / "k700_400ep_rep4_mr9_16x4.pyth",
        "RAW_UNLABELED": root / "raw-unlabeled",
        "RAW_LABELED": root / "raw-labeled",
        "UNLABELED": root / "unlabeled",
        "LABELED": root / "labeled",
        "RUNS": root / "runs",
    }.items():
        monkeypatch.setenv(name, str(value))
    return document_commands(text)


def test_document_commands_are_parsed_as_a_shell_would():
    text = 'x\n```sh\n# note\nvctmae eval --shards "$HOME/a b/*.tar" \\\n    --out o\n```\n'
    assert document_commands(text) == [
        ["vctmae", "eval", "--shards", f"{os.environ['HOME']}/a b/*.tar", "--out", "o"]
    ]
