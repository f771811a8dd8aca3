"""The miniature LLaVA testbed: synthetic charts (`charts`) and a small LLaVA target trained on them
(`target_training`). Together with an MSD draft trained against that target they give real acceptance
behaviour without real LLaVA weights (DESIGN 4.5).

    lmms-msd make-charts --out data/charts                   # the data
    lmms-msd train-target --data data/charts --out target    # tokenizer + target
    bash scripts/build_testbed.sh                            # data, target and draft (GPU settings)
"""
