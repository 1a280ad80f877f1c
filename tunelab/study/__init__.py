"""`tunelab study`: a grid of fine-tuning runs as one command, with a style-vs-forgetting report.

    tunelab study examples/study_2023_04_24.yaml              # the seed's 22 + 1 rows, quick scale
    tunelab study examples/study_2023_04_24.yaml --scale full
    tunelab study runs/study_2023_04_24 --report_only         # rebuild the report from the run dirs

Files, in the order a study uses them:
    spec.py         load and validate a study spec (YAML); expand it into row plans (pure)
    runner.py       train + evaluate each row into its own run dir; resume, failure isolation, workers
    trajectory.py   `eval_every`: score every saved checkpoint without generation; paths read back
    calibrate.py    the session's measurements: matmul peak, model shape, tokenized data sizes
    efficiency.py   FLOP formula, planned FLOPs and the ETA, study MFU and time split per row (pure)
    progress.py     the progress view (study.log) and efficiency.json's session record
    results.py      read the run dirs back into rows; seed aggregation, derived columns (pure over files)
    conclusions.py  the 2023 study's four conclusions as precise tests on those rows (pure)
    forgotten.py    per row, the general samples whose reference NLL rose most against the base
    figures.py      loss curves, the style-vs-retention scatter and trajectories (matplotlib, Agg)
    sections.py     the report's trajectory, "what was forgotten" and efficiency sections
    report.py       report.md, results.csv, report.html (one self-contained file)
    cli.py          the command line
    reference/      the published 2023 results (ChatGLM-6B on other data), shown side by side
"""
