"""The miniature LLaVA testbed: synthetic charts (`charts`) and a small LLaVA target trained on them
(`target_training`). Together with an MSD draft trained against that target they give real acceptance
behaviour without real LLaVA weights (DESIGN 4.5).

    python -m lmms_msd.testbed.charts --out data/charts                          # the data
    python -m lmms_msd.testbed.target_training --data data/charts --out target   # tokenizer + target
    bash scripts/build_testbed.sh                                                  # both, GPU settings
"""
