"""The field's harmful-fine-tuning protocol, as eval.py runs it; one job per file, in the protocol's order:

    stages.py      the cache (one folder per stage, locked, finished when its stage.json exists), the protocol's
                   fingerprint, the committed run JSONs that carry it
    data.py        the inputs resolved and checked, the evaluation subsets, the roles kept apart, the alignment data
    training.py    1-2. Align and attack: surgery.py runs as stages, the sweep's plan, the comparison defenses
    generation.py  3. Evaluate: greedy answers, HS per judge, fine-tune accuracy, over-refusal, held-out sink heads;
                   the development measurements
    judges.py      the keyword, embedding (logistic head on MiniLM vectors) and guard judges, and their accuracy
    reading.py     what an answer says: the task label it names, loops, on topic; a run's answers read
    categories.py  what each answer is (refusal / harmful / harmless / broken; helpful / refusal / broken),
                   kept in every run JSON (results/PROTOCOL.md section 3; checked against results/labels/)
    stats.py       4. Report, the numbers: bootstrap intervals, paired differences from SFT, the heads trend
    report.py      4. Report, the outputs: the run JSON, results.md, the plots
    pipeline.py    the whole protocol: choose the alignment and the attack regime, run the plan, report
"""
