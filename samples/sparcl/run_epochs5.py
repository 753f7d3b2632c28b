"""5 epochs per task (where the default schedule's DDR removes data) for dense DER++ and SparCL B=16 90%.

    python samples/sparcl/run_epochs5.py --runs dense-derpp:0 sparcl-block16-s90:0 ...
    python samples/sparcl/run_epochs5.py --summarize

Same settings as run_evidence.py except --epochs 5; runs go to runs/e5/, the summary to
results/epochs5/summary.{json,md}. sparcl-block16-s90 was run (2026-11-29 01:31-01:56 UTC) with the
schedule of that time, which removed 30% of each task's data at epoch 2; the scaled schedule now
waits for 5 presentations, so the same options remove nothing today (add --ddr-epochs 2 to a new
run to repeat it). sparcl-block16-s90-noddr is what the default schedule does now at 5 epochs.
"""
import sys

import run_evidence as ev

ev.COMMON = [("5" if i > 0 and ev.COMMON[i - 1] == "--epochs" else a) for i, a in enumerate(ev.COMMON)]
assert ev.COMMON[ev.COMMON.index("--epochs") + 1] == "5"
ev.RUNS = ev.HERE / "runs" / "e5"
ev.RESULTS = ev.HERE / "results" / "epochs5"
ev.CONFIGS = {"dense-derpp": ev.CONFIGS["dense-derpp"], "sparcl-block16-s90": ev.CONFIGS["sparcl-block16-s90"],
              "sparcl-block16-s90-noddr": ev.CONFIGS["sparcl-block16-s90-noddr"]}  # what DDR costs
ev.LABELS = {"dense-derpp": "dense DER++, 5 epochs",
             "sparcl-block16-s90": "B=16 90%, DDR removing 30% at epoch 2 (the schedule before 2026-11-29 04:00), 5 epochs",
             "sparcl-block16-s90-noddr": "**B=16 90%, no DDR (what the default schedule does at 5 epochs now)**"}

if __name__ == "__main__":
    ev.main()
