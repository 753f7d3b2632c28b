"""The paper's schedule: 50 epochs per task, dense DER++ and SparCL B=16 90%, paired seeds.

    python samples/sparcl/run_epochs50.py --workers 2 --runs dense-derpp:0 sparcl-block16-s90:0 ...
    python samples/sparcl/run_epochs50.py --summarize

Same settings as run_evidence.py except --epochs 50 (the trainer's default schedules then are the
paper's: mask updates every 5 epochs, DDR from epoch 5 to 20); runs go to runs/e50/, the summary to
results/epochs50/summary.{json,md}. About 40 min of CPU per dense run and 20 per SparCL run at one
thread here; an interrupted run resumes from its last finished task, so the seven paired seeds the
accuracy question needs can be spread over several sittings.
"""
import run_evidence as ev

ev.COMMON = [("50" if i > 0 and ev.COMMON[i - 1] == "--epochs" else a) for i, a in enumerate(ev.COMMON)]
assert ev.COMMON[ev.COMMON.index("--epochs") + 1] == "50"
ev.RUNS = ev.HERE / "runs" / "e50"
ev.RESULTS = ev.HERE / "results" / "epochs50"
ev.CONFIGS = {"dense-derpp": ev.CONFIGS["dense-derpp"], "sparcl-block16-s90": ev.CONFIGS["sparcl-block16-s90"]}
ev.LABELS = {"dense-derpp": "dense DER++, 50 epochs", "sparcl-block16-s90": "**B=16 90%, 50 epochs (the paper's schedule)**"}

if __name__ == "__main__":
    ev.main()
