"""`tunelab study`: a grid of fine-tuning runs as one command, with a style-vs-forgetting report.

    tunelab study examples/study_2023_04_24.yaml              # the seed's 22 + 1 rows, quick scale
    tunelab study examples/study_2023_04_24.yaml --scale full
    tunelab study runs/study_2023_04_24 --report_only         # rebuild the report from the run dirs

Files, in the order a study uses them:
    spec.py         load and validate a study spec (YAML); expand it into row plans (pure)
    runner.py       train + evaluate each row into its own run dir; resume, failure isolation, workers
    results.py      read the run dirs back into rows; seed aggregation, derived columns (pure over files)
    conclusions.py  the 2023 study's four conclusions as precise tests on those rows (pure)
    figures.py      loss curves and the style-vs-retention scatter (matplotlib, Agg)
    report.py       report.md, results.csv, report.html (one self-contained file)
    cli.py          the command line
    reference/      the published 2023 results (ChatGLM-6B on other data), shown side by side
"""
