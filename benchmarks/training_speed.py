"""Training throughput in the demo's configuration: locations per second, before / after in one run, and
torch.profiler's most expensive operators of one epoch.

    .venv/bin/python benchmarks/training_speed.py [--baseline REV] [--epochs N] [--quick]

Each variant trains OSS-Net C on the demo's synthetic training set (12 BraTS-like cases of 96 x 96 x 64, seed
0; 20 % held out, so 10 train) for --epochs epochs (default 4) without validation, in a fresh process, and
reports the training-set locations per second of the epochs after the first (which pays for torch.compile
and warm-up), the median over them. Variants:

- `before (REV)` (--baseline): the package as of git revision REV with the demo's configuration of then
  (decoder width 128, 4096 locations per volume, batch 2, fp32);
- `after, before's settings`: this checkout with those settings (decoder recomputation as the model defaults);
- `after, demo`: this checkout with `ossnet.demo.DemoOptions()`'s settings (what `make demo` trains);
- `after, demo, libgomp's default wait policy`: the same with OMP_WAIT_POLICY set empty, which ossnet would
  otherwise set to PASSIVE (see src/ossnet/__init__.py).

With --profile-rows N (default 15) the profile of the second epoch of the first and the last variant is
printed and written: operators sorted by their own CPU time. Every child runs with the environment this
script has, on the threads torch chooses.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (REPO, Provenance, add_baseline_option, argument_parser, markdown_table, package_source,
                    write_results)

# Runs in the child; argv[1] is a JSON object: data, run_dir, epochs, settings (TrainConfig keywords), profile.
CHILD = r"""
import json, sys
from dataclasses import replace
from pathlib import Path
from ossnet.training import TrainConfig, train
spec = json.loads(sys.argv[1])
config = TrainConfig(data=Path(spec["data"]), run_dir=Path(spec["run_dir"]), model="ossnet-c",
                     epochs=spec["epochs"], val_fraction=0.2, max_val_cases=0, **spec["settings"])
if spec["profile"]:
    # epoch 1 unprofiled (compilation, warm-up), then one epoch under the profiler, resumed from last.pt
    train(replace(config, epochs=1))
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train(replace(config, epochs=2, resume=True))
    print("PROFILE", json.dumps(prof.key_averages().table(sort_by="self_cpu_time_total",
                                                          row_limit=spec["profile"], max_name_column_width=44)))
else:
    train(config)
"""


def demo_settings() -> dict:
    """The TrainConfig keywords `ossnet demo` trains with (this checkout)."""
    from ossnet.demo import DemoOptions
    demo = DemoOptions()
    return {"batch_size": demo.batch_size, "locations": demo.locations, "lr": demo.lr,
            "precision": getattr(demo, "precision", "fp32"), "model_overrides": dict(demo.model_overrides)}


BEFORE_SETTINGS = {"batch_size": 2, "locations": 4096, "lr": 3e-3, "model_overrides": {"decoder_width": 128}}


def epoch_seconds(run_dir: Path) -> list[float]:
    """Seconds of training per epoch from metrics.csv (`train_seconds`, or `seconds` in older runs)."""
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    column = header.index("train_seconds" if "train_seconds" in header else "seconds")
    return [float(line.split(",")[column]) for line in lines[1:]]


def run_variant(data: Path, work: Path, name: str, settings: dict, epochs: int, source: Path | None,
                profile: int, env: dict | None = None) -> dict:
    run_dir = work / "".join(c if c.isalnum() else "_" for c in name)
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(source or REPO / "src")}
    spec = {"data": str(data), "run_dir": str(run_dir), "epochs": epochs, "settings": settings, "profile": 0}
    print(f"{name}: {epochs} epochs ...", flush=True)
    subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    seconds = epoch_seconds(run_dir)
    train_cases = len(json.loads((run_dir / "split.json").read_text())["train"])
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    result = {"name": name, "settings": settings, "epoch_seconds": seconds, "train_cases": train_cases,
              "locations_per_second": train_cases * settings["locations"] / steady}
    print(f"  epochs {', '.join(f'{s:.1f}' for s in seconds)} s -> {result['locations_per_second']:,.0f} "
          "locations/s", flush=True)
    if profile:
        spec = {**spec, "run_dir": str(run_dir) + "-profile", "profile": profile}
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, check=True,
                             capture_output=True, text=True).stdout
        result["profile"] = json.loads(next(line for line in out.splitlines()
                                            if line.startswith("PROFILE "))[len("PROFILE "):])
        print(result["profile"])
    return result


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    add_baseline_option(parser)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per variant (default 4, --quick 2)")
    parser.add_argument("--profile-rows", type=int, default=15,
                        help="operators of the profile of the first and last variant (0: no profile)")
    args = parser.parse_args()
    epochs = 2 if args.quick else args.epochs
    from ossnet.data import SynthOptions, write_synthetic_dataset
    with tempfile.TemporaryDirectory(prefix="ossnet-training-speed-") as folder, \
            package_source(args.baseline) as old_source:
        work = Path(folder)
        write_synthetic_dataset(SynthOptions(work / "data", "brats", 12, shape=(96, 96, 64), seed=0))
        variants = ([(f"before ({args.baseline})", BEFORE_SETTINGS, old_source, None)] if args.baseline else [])
        variants += [("after, before's settings", BEFORE_SETTINGS, None, None),
                     ("after, demo, libgomp's default wait policy", demo_settings(), None, {"OMP_WAIT_POLICY": ""}),
                     ("after, demo", demo_settings(), None, None)]
        results = [run_variant(work / "data", work, name, settings, epochs, source,
                               args.profile_rows if i in (0, len(variants) - 1) else 0, env)
                   for i, (name, settings, source, env) in enumerate(variants)]
    first = results[0]["locations_per_second"]
    rows = [[r["name"], json.dumps(r["settings"]), ", ".join(f"{s:.1f}" for s in r["epoch_seconds"]),
             f"{r['locations_per_second']:,.0f}", f"{r['locations_per_second'] / first:.2f}x"] for r in results]
    body = (f"OSS-Net C on the demo's training set (10 training cases of 96 x 96 x 64), {epochs} epochs per "
            "variant in a fresh process; locations/s = training cases x locations per volume / the median "
            "epoch after the first (which pays for compilation and warm-up).\n\n"
            + markdown_table(["variant", "settings", "epochs (s)", "locations/s", f"vs {results[0]['name']}"],
                             rows))
    for r in results:
        if "profile" in r:
            body += f"\n\nProfile of one epoch, {r['name']} (operators by self CPU time):\n\n```\n{r['profile']}```\n"
    write_results("training-speed", args.device, args.quick, Provenance.collect(args.device), body,
                  {"results": results})


if __name__ == "__main__":
    main()
