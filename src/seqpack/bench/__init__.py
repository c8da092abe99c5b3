"""The ``seqpack-bench`` command: padding vs transformers' packing vs seqpack on the same batches.

Layout, in the order a run flows:
    data.py     the embedded GSM8K token ids, a user's JSONL, seeded batches
    presets.py  published model configs built with random weights, or from_pretrained
    modes.py    the registry of modes: how a batch is fed and what is done to the model
    run.py      one (model, mode): training steps, timing, memory; the first-loss check
    parallel.py --nproc: the launcher, the process group, DDP / FSDP2 wrapping
    report.py   the table, the JSON records, the plot
    cli.py      argument parsing and ``main()``

Importing this package imports nothing heavy; ``python -m seqpack.bench`` runs the command.
"""
