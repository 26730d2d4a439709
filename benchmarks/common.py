"""What every benchmark script shares: command-line options, provenance (command, date, commit, machine),
the paper's published figures and the result files under docs/benchmarks/.

A script writes `docs/benchmarks/<name>-<device>[-quick].{md,json,csv,png}` and, for full runs, replaces
the block between `<!-- <name>-<device>:begin -->` and `<!-- <name>-<device>:end -->` in
docs/benchmarks/README.md with its Markdown table, so the README always shows the last full run while the
interpretation around the block stays hand-written.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

try:
    from ossnet.inference.field import occupancy_field, probabilities_from_logits
except ImportError:  # a --baseline package from before inference/ had one module per job
    from ossnet.inference.volume import occupancy_field, probabilities_from_logits

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "docs" / "benchmarks"
README = RESULTS_DIR / "README.md"
GB = 2**30  # "GB" in every table: GiB, as torch.cuda memory figures are usually quoted

# The paper's memory table, BraTS columns: GPU memory in GB for training with 2^14 locations per volume,
# inference with 2^14 and 2^17 locations per decoder chunk (U-Nets: dense 3D prediction / one 2D slice in the 2^14 column).
PAPER_MEMORY_GB = {
    "unet3d": (14.41, 3.57, None),
    "unet2d": (1.16, 0.46, None),
    "onet": (2.35, 0.29, 1.93),
    "ossnet-a": (2.58, 0.39, 2.73),
    "ossnet-b": (2.76, 0.48, 3.45),
    "ossnet-c": (2.59, 0.39, 2.73),
    "ossnet-d": (2.76, 0.48, 3.46),
}
# Row labels of the tables: the paper's names, and the patch-trained U-Net, which the paper does not have.
MODEL_NAMES = {"unet3d": "3D res. U-Net", "unet2d": "2D res. U-Net", "onet": "O-Net", "ossnet-a": "OSS-Net A",
               "ossnet-b": "OSS-Net B", "ossnet-c": "OSS-Net C", "ossnet-d": "OSS-Net D",
               "unet3d-patch": "3D res. U-Net, patches"}
# The ablation U-Net: MONAI's default residual U-Net, whose first unit strides (no full-resolution level);
# `models.create("unet3d", **MONAI_DEFAULT_UNET)`.
MONAI_DEFAULT_UNET = {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2)}
# BraTS: 240 x 240 x 155 padded to the working shape; the encoder sees it downscaled by 2.
BRATS_SHAPE = (240, 240, 155)
BRATS_WORKING_SHAPE = (256, 256, 160)


def argument_parser(description: str) -> argparse.ArgumentParser:
    """Options every script takes: --device and --quick."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where models run (cuda: memory is torch.cuda.max_memory_allocated)")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller, faster variant; results go to *-quick files and not into the README")
    return parser


def add_baseline_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline", metavar="REV",
                        help="also measure the package as of git revision REV (e.g. 873f1d9), in the same run, "
                             "for before / after figures")


@contextlib.contextmanager
def package_source(revision: str | None):
    """The folder to put on PYTHONPATH for child processes that must import ossnet as of git `revision`
    (a temporary export of its src/), or None for the package this script runs with."""
    if revision is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="ossnet-baseline-") as folder:
        archive = subprocess.run(["git", "archive", revision, "src"], cwd=REPO, capture_output=True, check=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(folder, filter="data")
        yield Path(folder) / "src"


@contextlib.contextmanager
def children_import(source: Path | None):
    """Within the block, child processes (which inherit os.environ) import ossnet from `source` (None: as
    this process does)."""
    if source is None:
        yield
        return
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(source)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device on this machine")


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} (working tree with uncommitted changes)" if dirty else commit


def _cpu_model() -> str:
    match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    return match.group(1).strip() if match else platform.processor() or "unknown"


def _ram_gb() -> float:
    match = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 / GB


@dataclass(frozen=True)
class Provenance:
    """How a result was obtained: the exact command, when, at which commit, on what machine."""

    command: str
    date: str
    commit: str
    cpu: str
    cores: int
    ram_gb: float
    torch: str
    device: str

    @classmethod
    def collect(cls, device: str) -> "Provenance":
        script = os.path.relpath(sys.argv[0], REPO)
        command = " ".join([".venv/bin/python", script, *map(shlex.quote, sys.argv[1:])])
        device_name = (f"cuda ({torch.cuda.get_device_name(0)})" if device == "cuda"
                       else f"cpu ({torch.get_num_threads()} torch threads)")
        return cls(command=command, date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                   commit=_git_commit(), cpu=_cpu_model(), cores=os.cpu_count() or 0,
                   ram_gb=round(_ram_gb(), 1), torch=torch.__version__, device=device_name)

    def markdown(self) -> str:
        return (f"- command: `{self.command}`\n- date: {self.date}\n- commit: {self.commit}\n"
                f"- machine: {self.cpu}, {self.cores} cores, {self.ram_gb} GB RAM; torch {self.torch}; "
                f"device {self.device}\n")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def result_stem(name: str, device: str, quick: bool) -> str:
    """File stem of a result: memory-cpu, memory-cuda-quick, ..."""
    return f"{name}-{device}" + ("-quick" if quick else "")


def write_results(name: str, device: str, quick: bool, provenance: Provenance, body: str, raw: dict,
                  stem: str | None = None) -> Path:
    """Write `<stem>.md` (provenance + body) and `<stem>.json` (provenance + raw figures); a full run also
    replaces its block in the README. `stem` defaults to `result_stem(name, device, quick)`. Returns the
    Markdown path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = stem or result_stem(name, device, quick)
    section = provenance.markdown() + "\n" + body
    markdown = RESULTS_DIR / f"{stem}.md"
    markdown.write_text(f"# {name} ({device}{', quick' if quick else ''})\n\n{section}")
    (RESULTS_DIR / f"{stem}.json").write_text(
        json.dumps({"provenance": asdict(provenance), **raw}, indent=2, default=str) + "\n")
    if not quick:
        _replace_readme_block(stem, section)
    print(f"\nwrote {os.path.relpath(markdown, REPO)} and {stem}.json")
    return markdown


def _replace_readme_block(stem: str, section: str) -> None:
    begin, end = f"<!-- {stem}:begin -->", f"<!-- {stem}:end -->"
    if not README.is_file() or begin not in (text := README.read_text()):
        print(f"(no {begin} block in {os.path.relpath(README, REPO)}; README left as it is)")
        return
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    README.write_text(f"{head}{begin}\n{section.rstrip()}\n{end}{tail}")


def gb(num_bytes: float | None) -> str:
    return "" if num_bytes is None else f"{num_bytes / GB:.2f}"
