"""The README and docs/ tell the truth about the repository.

- A YAML block marked ``<!-- file: PATH -->`` is that shipped file, byte for byte (up to the
  trailing newline); every other YAML block is marked ``<!-- example -->``.
- Every command in the README's "Quick start" and "Your data on your GPUs" parses: each bash
  block runs in bash with ``fvlab`` (and ``srun``, ``make``, ...) replaced by recorders, then each
  recorded ``fvlab`` command goes through fvlab's own parser in-process, without training:
  ``fit`` with ``--print_config`` (LightningCLI parses and checks every key and value, prints the resolved config),
  ``validate``/``test`` through the same option parser and experiment loader, ``sweep`` through
  its parser and ``prepare_sweep`` (the sweep file, its base experiment and every space key
  checked, nothing written), anything else with ``--help``. The placeholder data roots point at
  a throwaway image tree.
- Relative links of README.md and docs/*.md point at files (and headings) that exist.
- The ``fvlab`` command's process-wide malloc tuning can be turned off.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
COMMAND_SECTIONS = ("Quick start", "Your data on your GPUs")
# Placeholders the README uses for the reader's own data.
PLACEHOLDER_ROOTS = ("/path/to/imagenet", "/path/to/my_images")

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!--\s*(file:\s*(?P<path>\S+)|example)\s*-->")

pytestmark = pytest.mark.xdist_group("readme")


def fenced_blocks(text: str) -> list[tuple[str, str, str]]:
    """(language, body, the last non-empty line before the block) of every fenced code block."""
    found = []
    for match in FENCE.finditer(text):
        before = [line for line in text[:match.start()].splitlines() if line.strip()]
        found.append((match.group(1).strip(), match.group(2), before[-1].strip() if before else ""))
    return found


def section(text: str, title: str) -> str:
    """The text of the ``## title`` section, up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


# ---- (a) YAML blocks: shipped files are shown as they are ---------------------------------


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_yaml_blocks_are_the_shipped_files_or_say_they_are_examples(page: Path) -> None:
    for lang, body, before in fenced_blocks(page.read_text()):
        if lang not in ("yaml", "yml"):
            continue
        marker = MARKER.fullmatch(before)
        assert marker, (f"{page.name}: a YAML block must follow <!-- file: PATH --> or <!-- example -->; "
                        f"this one follows {before!r}:\n{body[:200]}")
        if marker.group("path"):
            shipped = ROOT / marker.group("path")
            assert shipped.is_file(), f"{page.name}: {marker.group('path')} does not exist"
            assert body.rstrip("\n") == shipped.read_text().rstrip("\n"), (
                f"{page.name}: the block marked {marker.group('path')} differs from the file; paste the file")


def test_readme_shows_the_shipped_sweep_file() -> None:
    shown = {MARKER.fullmatch(before).group("path") for lang, _, before in fenced_blocks(README.read_text())
             if lang == "yaml" and MARKER.fullmatch(before)}
    assert "sweeps/hat_search.yaml" in shown


# ---- (b) every command of Quick start and "Your data on your GPUs" parses ------------------

# Recorders for the commands the blocks run: fvlab's arguments go to $FVLAB_ARGV (unit separator
# between arguments, record separator after each command); the rest do nothing, except srun,
# which runs its command. Any other command runs for real (sed), so a stray one fails loudly.
BASH_PRELUDE = r"""
set -euo pipefail
fvlab() { printf '%s\x1f' "$@" >> "$FVLAB_ARGV"; printf '\x1e' >> "$FVLAB_ARGV"; }
srun() { "$@"; }
make() { :; }
tensorboard() { :; }
optuna-dashboard() { :; }
pip() { :; }
sbatch() { :; }
"""


def image_tree(root: Path) -> Path:
    """A two-class ImageFolder tree with train/ and val/ (no test/, like ImageNet)."""
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (16, 16)).save(root / split / cls / "0.png")
    return root


def recorded_commands(tmp_path: Path) -> list[list[str]]:
    """Run the bash blocks of the command sections in a scratch directory; the fvlab argv each ran."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("experiments", "sweeps"):
        (work / name).symlink_to(ROOT / name)
    tree = image_tree(tmp_path / "images")
    record = tmp_path / "argv"
    record.touch()
    text = README.read_text()
    env = {**os.environ, "FVLAB_ARGV": str(record), "SLURM_ARRAY_TASK_ID": "0"}
    for title in COMMAND_SECTIONS:
        for lang, body, _ in fenced_blocks(section(text, title)):
            if lang not in ("bash", "sh", "shell"):
                continue
            for placeholder in PLACEHOLDER_ROOTS:
                body = body.replace(placeholder, str(tree))
            done = subprocess.run(["bash", "-c", BASH_PRELUDE + body], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, f"README block in {title!r} failed in bash:\n{body}\n{done.stderr}"
    commands = [entry.split("\x1f")[:-1] for entry in record.read_text().split("\x1e")[:-1]]
    return [command for command in commands if command]


@pytest.fixture(scope="module")
def commands(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[str]]]:
    tmp_path = tmp_path_factory.mktemp("readme")
    return tmp_path, recorded_commands(tmp_path)


def test_command_sections_hold_the_commands_a_newcomer_needs(commands) -> None:
    _, found = commands
    subcommands = {command[0] for command in found}
    assert {"fit", "test", "sweep", "report"} <= subcommands, subcommands
    joined = [" ".join(command) for command in found]
    assert any("--trainer.strategy ddp" in c and "--trainer.sync_batchnorm" in c for c in joined), joined
    assert any(c.startswith("fit ") and "--variant" in c for c in joined), joined


def check_command(argv: list[str], work: Path, tree: Path, capsys: pytest.CaptureFixture) -> None:
    """Parse one README command the way fvlab does, without training or writing anything."""
    from fvlab import cli

    command, rest = argv[0], argv[1:]
    where = f"README command `fvlab {' '.join(argv)}`"
    if command == "fit":
        assert cli.main(["fit", *rest] + ([] if "--print_config" in rest else ["--print_config"])) == 0, (
            f"{where}: {capsys.readouterr().err}")
        printed = capsys.readouterr().out
        assert printed.startswith("name: "), where
        if "--data.init_args.root" in rest:
            assert str(tree) in printed, f"{where}: the data root override did not reach the config"
    elif command in ("validate", "test"):
        from fvlab.lit.build import build_run

        args, overrides = cli._split_fit_args(f"fvlab {command}", rest, "", seeds=True)
        experiment, selected, _ = cli._load_selection(args)  # the file, the variant (BadInput if wrong)
        assert len(selected) == 1 or args.variant, f"{where}: several variants; name one"
        with pytest.raises(SystemExit) as done:  # LightningCLI parses the overrides, prints, builds nothing
            build_run(experiment.layers(selected[0]), None, [*overrides, "--print_config"])
        assert done.value.code in (0, None), where
        capsys.readouterr()
    elif command == "sweep":
        from fvlab.sweep.command import _parser, prepare_sweep

        sweep, _, _ = prepare_sweep(_parser().parse_args(rest))
        root = sweep.overrides.get("data.init_args.root")
        assert root is None or root == str(tree), f"{where}: the sweep still reads {root}"
    elif command in cli.COMMANDS:
        assert cli.main([command, *rest, "--help"]) == 0, where
        capsys.readouterr()
    else:
        pytest.fail(f"{where}: unknown command {command!r}")


def test_every_command_of_quick_start_and_your_data_parses(commands, monkeypatch, capsys) -> None:
    tmp_path, found = commands
    monkeypatch.setenv("FVLAB_TUNE_ALLOCATOR", "0")  # leave this process's malloc alone
    monkeypatch.chdir(tmp_path / "work")
    for argv in found:
        check_command(argv, tmp_path / "work", tmp_path / "images", capsys)


def test_the_imagenet_sweep_command_sets_the_data_root(commands) -> None:
    _, found = commands
    searches = [command for command in found if command[0] == "sweep" and "imagenet_hat_search" in command[1]]
    assert searches, "the README no longer shows the ImageNet search"
    for command in searches:  # check_command checks that the root reaches the sweep's overrides
        assert any(item.startswith("data.init_args.root=") for item in command[command.index("--set"):]), command
    shipped = (ROOT / "sweeps" / "imagenet_hat_search.yaml").read_text()
    assert "root: /data/imagenet" in shipped, "--set changes nothing: where is the shipped root?"
    assert "model/speedup" in shipped  # the multi-machine search optimises what holds across machines


# ---- (c) links --------------------------------------------------------------------------

LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    text = FENCE.sub("", page.read_text())
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_what_exists(page: Path) -> None:
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: link to {target} points at nothing"
        if anchor:
            assert anchor in anchors(linked), f"{page.name}: no heading for #{anchor} in {linked.name}"


def test_pages_speak_of_the_project_not_of_how_they_were_written() -> None:
    for page in PAGES:
        text = page.read_text().lower()
        for phrase in ("design.md", "design document", "this session", "earlier session", "later session",
                       "a later session", "single-run tables of earlier", "this machine", "local disk"):
            assert phrase not in text, f"{page.name} says {phrase!r}"


# ---- (d) the malloc tuning can be turned off ---------------------------------------------


@pytest.mark.parametrize("value, enabled", [(None, True), ("1", True), ("0", False), ("false", False),
                                            ("No", False), (" off ", False), ("yes", True)])
def test_allocator_tuning_switch(value: str | None, enabled: bool) -> None:
    from fvlab.runtime import allocator_tuning_enabled

    environ = {} if value is None else {"FVLAB_TUNE_ALLOCATOR": value}
    assert allocator_tuning_enabled(environ) is enabled


# Runs the fvlab command's entry point told to leave malloc alone, then as by default, and after
# each asks glibc (mallinfo2) whether a fresh 64 MiB block was served by mmap: glibc's default
# does so for anything above its mmap threshold, while the command's tuning (M_MMAP_MAX 0) keeps
# every block in the heap.
MMAPPED_AFTER_COMMAND = """
import contextlib, ctypes, io, json, os
from fvlab.cli import main

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                      "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]

def command_then_block():
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["--help"])
    before = libc.mallinfo2().hblks
    libc.malloc(64 * 2**20)
    return {"code": code, "mmapped": libc.mallinfo2().hblks - before}

os.environ["FVLAB_TUNE_ALLOCATOR"] = "0"
told = command_then_block()
del os.environ["FVLAB_TUNE_ALLOCATOR"]
print(json.dumps({"told": told, "default": command_then_block()}))
"""


def _glibc_version() -> tuple[int, ...]:
    name, version = platform.libc_ver()
    return tuple(int(part) for part in version.split(".")) if name == "glibc" and version else ()


@pytest.mark.skipif(not sys.platform.startswith("linux") or _glibc_version() < (2, 33),
                    reason="glibc's mallopt and mallinfo2 (2.33+)")
def test_fvlab_command_leaves_malloc_alone_when_told() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "FVLAB_TUNE_ALLOCATOR"}
    out = subprocess.run([sys.executable, "-c", MMAPPED_AFTER_COMMAND], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["told"] == {"code": 0, "mmapped": 1}  # FVLAB_TUNE_ALLOCATOR=0: glibc's own state
    assert result["default"] == {"code": 0, "mmapped": 0}  # by default the command tunes malloc
